// Worklist live refresh: poll the JSON worklist with the page's own filters and redraw the rows,
// so new and newly urgent studies appear without a reload.  Rows are built with textContent
// (never innerHTML) because patient names come from the modality.
"use strict";

(function () {
  var list = document.getElementById("worklist");
  if (!list) { return; }
  var lastSignature = "";

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) { node.className = cls; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function row(r) {
    var a = el("a", "study-row prio-" + r.priority);
    a.href = document.body.dataset.studyUrl.replace("__UID__", encodeURIComponent(r.study_uid));
    a.dataset.uid = r.study_uid;
    a.appendChild(el("span", "prio-badge", r.priority_label));
    var who = el("span", "who");
    who.appendChild(el("strong", "pname", r.patient_name || "—"));
    var meta = list.dataset.idLabel + " " + r.patient_id + (r.age ? " · " + r.age : "") + (r.sex ? " · " + r.sex : "");
    who.appendChild(el("span", "pmeta", meta));
    a.appendChild(who);
    var what = el("span", "what");
    what.appendChild(el("strong", "", r.modalities || "—"));
    what.appendChild(el("span", "pmeta", r.received));
    a.appendChild(what);
    a.appendChild(el("span", "ai ai-" + r.ai.kind, r.ai.text));
    var chips = el("span", "chips");
    r.chips.forEach(function (c) {
      chips.appendChild(el("span", "chip" + (c.done ? " done" : "") + (c.current ? " current" : ""), c.label));
    });
    a.appendChild(chips);
    return a;
  }

  function render(data) {
    var signature = JSON.stringify(data);
    if (signature === lastSignature) { return; }  // nothing changed: leave the DOM (and scroll) alone
    lastSignature = signature;
    var fragment = document.createDocumentFragment();
    data.rows.forEach(function (r) { fragment.appendChild(row(r)); });
    if (!data.rows.length) { fragment.appendChild(el("p", "empty", list.dataset.empty)); }
    list.replaceChildren(fragment);
    var label = document.getElementById("page-label");
    if (label) {
      label.textContent = fill(list.dataset.pageLabel, {"__PS__": String(data.pages), "__P__": String(data.page),
                                                         "__T__": String(data.total)});
    }
  }

  function poll() {
    getJSON(list.dataset.api + window.location.search).then(render).catch(function () { /* retry next time */ });
  }

  window.setInterval(poll, parseInt(document.body.dataset.pollMs, 10) || 5000);
})();
