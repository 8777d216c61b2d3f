// Clinic AI: urgent alerts on every page.  Poll the alerts endpoint; show a red banner (and a
// short tone) until the user acknowledges.  Uses getJSON/postJSON/fill from the core's core.js.
"use strict";

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

document.addEventListener("DOMContentLoaded", function () { Alerts.start(); });
