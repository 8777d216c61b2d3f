// Clinic AI: shared behaviour on every page (vanilla JS, no external code, CSP-safe).
// - postJSON(): state-changing requests carry the CSRF token from the page's meta tag.
// - urgent alerts: poll the alerts endpoint; show a red banner (and a short tone) until the
//   user acknowledges.
// - PIN keypad on the sign-in page.
"use strict";

function csrfToken() {
  var meta = document.querySelector('meta[name="csrf-token"]');
  return meta ? meta.getAttribute("content") : "";
}

function postJSON(url, body) {
  return fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: {"Content-Type": "application/json", "X-CSRF-Token": csrfToken()},
    body: JSON.stringify(body || {})
  });
}

function getJSON(url) {
  return fetch(url, {credentials: "same-origin", headers: {"Accept": "application/json"}}).then(function (r) {
    if (r.status === 401) { window.location.reload(); throw new Error("signed out"); }
    if (!r.ok) { throw new Error("HTTP " + r.status); }
    return r.json();
  });
}

function fill(template, values) {
  return Object.keys(values).reduce(function (text, key) { return text.split(key).join(values[key]); }, template);
}

var Alerts = {
  shownTop: 0, newest: 0,
  beep: function () {
    // A short two-tone chime; browsers may block audio until the first touch, which is fine.
    try {
      var Ctx = window.AudioContext || window.webkitAudioContext;
      if (!Ctx) { return; }
      var ctx = new Ctx();
      [880, 660].forEach(function (freq, i) {
        var osc = ctx.createOscillator(), gain = ctx.createGain();
        osc.frequency.value = freq; gain.gain.value = 0.2;
        osc.connect(gain); gain.connect(ctx.destination);
        osc.start(ctx.currentTime + i * 0.25); osc.stop(ctx.currentTime + i * 0.25 + 0.2);
      });
    } catch (e) { /* no audio device */ }
  },
  render: function (alerts) {
    var body = document.body, banner = document.getElementById("alert");
    if (!banner) { return; }
    if (!alerts.length) { banner.hidden = true; return; }
    var top = alerts[0], who = (top.patient_name || "") + " (" + top.patient_id + ")";
    Alerts.newest = Math.max.apply(null, alerts.map(function (a) { return a.id; }));
    document.getElementById("alert-text").textContent = alerts.length === 1
      ? fill(body.dataset.msgUrgentOne, {"__WHO__": who})
      : fill(body.dataset.msgUrgentMany, {"__N__": String(alerts.length), "__WHO__": who});
    document.getElementById("alert-open").href = body.dataset.studyUrl.replace("__UID__", encodeURIComponent(top.study_uid));
    if (Alerts.newest > Alerts.shownTop) {
      Alerts.shownTop = Alerts.newest;
      banner.classList.remove("flash-on"); void banner.offsetWidth; banner.classList.add("flash-on");
      Alerts.beep();
    }
    banner.hidden = false;
  },
  poll: function () {
    getJSON(document.body.dataset.alertsUrl).then(function (data) { Alerts.render(data.alerts); })
      .catch(function () { /* next poll retries */ });
  },
  acknowledge: function () {
    postJSON(document.body.dataset.ackUrl, {upto: Alerts.newest}).then(function (r) { return r.json(); })
      .then(function (data) { Alerts.render(data.alerts || []); });
  },
  start: function () {
    if (!document.body.dataset.alertsUrl) { return; }
    document.getElementById("alert-ack").addEventListener("click", Alerts.acknowledge);
    Alerts.poll();
    window.setInterval(Alerts.poll, parseInt(document.body.dataset.pollMs, 10) || 5000);
  }
};

function keypad() {
  var pad = document.querySelector(".keypad");
  if (!pad) { return; }
  var input = document.getElementById(pad.dataset.target);
  pad.addEventListener("click", function (event) {
    var key = event.target.closest("[data-key]");
    if (!key) { return; }
    var k = key.dataset.key;
    if (k === "⌫") { input.value = input.value.slice(0, -1); }
    else if (k === "✓") { input.form.requestSubmit ? input.form.requestSubmit() : input.form.submit(); }
    else if (input.value.length < 8) { input.value += k; }
  });
}

document.addEventListener("DOMContentLoaded", function () {
  Alerts.start();
  keypad();
});
