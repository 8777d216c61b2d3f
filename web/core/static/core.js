// Shared behaviour on every page of every app (vanilla JS, no external code, CSP-safe); loaded
// before the app's own scripts, which use these helpers.
// - postJSON(): state-changing requests carry the CSRF token from the page's meta tag.
// - getJSON(): a 401 (the session ended) reloads the page, which leads to the sign-in page.
// - fill(): put values into a translated message template carried in a data attribute.
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

document.addEventListener("DOMContentLoaded", keypad);
