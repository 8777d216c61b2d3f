// Study image viewer: pinch / drag zoom and pan with pointer events (touch, pen, mouse),
// zoom buttons for gloved hands, window presets, frame scrubbing for clips, and the AI heatmap
// as a second image stacked exactly over the first with adjustable opacity.
"use strict";

(function () {
  var viewer = document.getElementById("viewer");
  if (!viewer) { return; }
  var stage = document.getElementById("stage");
  var base = document.getElementById("base-img");
  var heat = document.getElementById("heat-img");
  var msg = document.getElementById("viewer-msg");
  var heatNote = document.getElementById("heat-note");
  var heatToggle = document.getElementById("heat-toggle");
  var opacity = document.getElementById("heat-opacity");
  var preset = document.getElementById("preset");
  var frameInput = document.getElementById("frame");
  var frameOut = document.getElementById("frame-out");
  var frameTools = document.getElementById("frame-tools");
  var MIN_SCALE = 0.05, MAX_SCALE = 12;
  var view = {scale: 1, x: 0, y: 0};
  var current = null;        // the selected image button's dataset
  var heatOn = false;
  var pointers = new Map();  // pointerId -> {x, y}
  var gesture = null;

  function apply() {
    stage.style.transform = "translate(" + view.x + "px," + view.y + "px) scale(" + view.scale + ")";
    viewer.dataset.scale = view.scale.toFixed(3);
  }

  function fit() {
    var w = base.naturalWidth, h = base.naturalHeight;
    if (!w || !h) { return; }
    var box = viewer.getBoundingClientRect();
    view.scale = Math.min(box.width / w, box.height / h);
    view.x = (box.width - w * view.scale) / 2;
    view.y = (box.height - h * view.scale) / 2;
    apply();
  }

  // Zoom by `factor` keeping the point (cx, cy) in viewer coordinates fixed on screen.
  function zoomAt(factor, cx, cy) {
    var next = Math.min(MAX_SCALE, Math.max(MIN_SCALE, view.scale * factor));
    factor = next / view.scale;
    view.x = cx - (cx - view.x) * factor;
    view.y = cy - (cy - view.y) * factor;
    view.scale = next;
    apply();
  }

  function centre() {
    var box = viewer.getBoundingClientRect();
    return {x: box.width / 2, y: box.height / 2};
  }

  function local(event) {
    var box = viewer.getBoundingClientRect();
    return {x: event.clientX - box.left, y: event.clientY - box.top};
  }

  function startGesture() {
    var pts = Array.from(pointers.values());
    if (pts.length === 1) {
      gesture = {kind: "pan", x: pts[0].x, y: pts[0].y, vx: view.x, vy: view.y};
    } else if (pts.length >= 2) {
      var dx = pts[1].x - pts[0].x, dy = pts[1].y - pts[0].y;
      gesture = {kind: "pinch", dist: Math.hypot(dx, dy) || 1, scale: view.scale,
                 mx: (pts[0].x + pts[1].x) / 2, my: (pts[0].y + pts[1].y) / 2, vx: view.x, vy: view.y};
    } else {
      gesture = null;
    }
  }

  viewer.addEventListener("pointerdown", function (event) {
    viewer.setPointerCapture(event.pointerId);
    pointers.set(event.pointerId, local(event));
    startGesture();
    event.preventDefault();
  });
  viewer.addEventListener("pointermove", function (event) {
    if (!pointers.has(event.pointerId) || !gesture) { return; }
    pointers.set(event.pointerId, local(event));
    var pts = Array.from(pointers.values());
    if (gesture.kind === "pan" && pts.length === 1) {
      view.x = gesture.vx + pts[0].x - gesture.x;
      view.y = gesture.vy + pts[0].y - gesture.y;
      apply();
    } else if (gesture.kind === "pinch" && pts.length >= 2) {
      var dist = Math.hypot(pts[1].x - pts[0].x, pts[1].y - pts[0].y);
      var mx = (pts[0].x + pts[1].x) / 2, my = (pts[0].y + pts[1].y) / 2;
      var scale = Math.min(MAX_SCALE, Math.max(MIN_SCALE, gesture.scale * dist / gesture.dist));
      var k = scale / gesture.scale;
      // The image point under the starting midpoint follows the fingers' midpoint.
      view.x = mx - (gesture.mx - gesture.vx) * k;
      view.y = my - (gesture.my - gesture.vy) * k;
      view.scale = scale;
      apply();
    }
  });
  function release(event) {
    pointers.delete(event.pointerId);
    startGesture();
  }
  viewer.addEventListener("pointerup", release);
  viewer.addEventListener("pointercancel", release);
  viewer.addEventListener("wheel", function (event) {
    event.preventDefault();
    var p = local(event);
    zoomAt(event.deltaY < 0 ? 1.15 : 1 / 1.15, p.x, p.y);
  }, {passive: false});
  viewer.addEventListener("dblclick", fit);

  document.getElementById("zoom-in").addEventListener("click", function () { var c = centre(); zoomAt(1.25, c.x, c.y); });
  document.getElementById("zoom-out").addEventListener("click", function () { var c = centre(); zoomAt(0.8, c.x, c.y); });
  document.getElementById("zoom-fit").addEventListener("click", fit);

  function frameIndex() { return parseInt(frameInput.value, 10) || 0; }

  function imageUrl() {
    var params = new URLSearchParams();
    if (parseInt(current.frames, 10) > 1) { params.set("frame", String(frameIndex())); }
    if (current.grey === "1" && preset.value !== "standard") { params.set("preset", preset.value); }
    var query = params.toString();
    return current.src + (query ? "?" + query : "");
  }

  function showHeat() {
    // The heatmap explains one frame (the analysed one): shown only when that frame is on screen.
    var onFrame = parseInt(current.frames, 10) <= 1 || frameIndex() === parseInt(current.analysedFrame, 10);
    var visible = heatOn && !!current.heat && onFrame;
    heat.hidden = !visible;
    heatNote.hidden = !visible;
    heat.style.opacity = String(parseInt(opacity.value, 10) / 100);
    heatToggle.setAttribute("aria-pressed", heatOn ? "true" : "false");
    viewer.dataset.heatmap = visible ? "on" : "off";
  }

  var loadTimer = null, firstLoad = true;
  function load(refit) {
    window.clearTimeout(loadTimer);
    loadTimer = window.setTimeout(function () {
      msg.hidden = true;
      viewer.dataset.loading = "1";
      base.onload = function () {
        viewer.dataset.loading = "0";
        if (refit || firstLoad) { fit(); firstLoad = false; }
      };
      base.onerror = function () {
        viewer.dataset.loading = "0";
        msg.textContent = viewer.dataset.error || "Image could not be displayed.";
        msg.hidden = false;
      };
      base.src = imageUrl();
    }, refit ? 0 : 60);  // debounce slider scrubbing
  }

  function select(button) {
    document.querySelectorAll(".img-btn").forEach(function (b) { b.classList.toggle("btn-primary", b === button); });
    current = button.dataset;
    var frames = parseInt(current.frames, 10) || 1;
    frameTools.hidden = frames <= 1;
    frameInput.max = String(frames - 1);
    frameInput.value = current.analysedFrame || "0";
    frameOut.textContent = String(frameIndex() + 1) + " / " + frames;
    document.getElementById("preset-tools").hidden = current.grey !== "1";
    document.getElementById("heat-tools").hidden = !current.heat;
    if (current.heat) { heat.src = current.heat; }
    showHeat();
    load(true);
  }

  heatToggle.addEventListener("click", function () { heatOn = !heatOn; showHeat(); });
  opacity.addEventListener("input", showHeat);
  preset.addEventListener("change", function () { load(false); });
  frameInput.addEventListener("input", function () {
    frameOut.textContent = String(frameIndex() + 1) + " / " + current.frames;
    showHeat();
    load(false);
  });
  document.getElementById("frame-analysed").addEventListener("click", function () {
    frameInput.value = current.analysedFrame;
    frameInput.dispatchEvent(new Event("input"));
  });
  document.querySelectorAll(".img-btn").forEach(function (b) {
    b.addEventListener("click", function () { select(b); });
  });
  window.addEventListener("resize", fit);

  var first = document.querySelector(".img-btn");
  if (first) { select(first); }
})();
