// The console's progressive enhancement: live refresh (Server-Sent Events, else polling), the
// composer's segment counter, and one submit per form. Every page works without it.
"use strict";

(function () {
  var POLL_MS = 5000;

  function refresher() {
    var body = document.body;
    var target = body.dataset.target && document.getElementById(body.dataset.target);
    if (!target || !body.dataset.refresh) { return null; }
    var url = new URL(body.dataset.refresh, window.location.href);
    url.searchParams.set("partial", "1");
    var busy = false;
    var again = false;  // a change came while a fetch was under way: it may have read the page before it
    return function refresh() {
      if (busy) { again = true; return; }
      busy = true;
      again = false;
      fetch(url.toString(), { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (response) { return response.ok ? response.text() : null; })
        .then(function (html) { if (html !== null && html !== target.innerHTML) { target.innerHTML = html; } })
        .catch(function () {})
        .then(function () {
          busy = false;
          if (again) { refresh(); }
        });
    };
  }

  function live() {
    var refresh = refresher();
    if (!refresh) { return; }
    var polling = null;
    function poll() { if (!polling) { polling = window.setInterval(refresh, POLL_MS); } }
    if (!window.EventSource) { poll(); return; }
    var stream = new EventSource(document.body.dataset.live);
    stream.addEventListener("change", refresh);
    stream.addEventListener("open", refresh);  // whatever changed while it was connecting
    stream.addEventListener("error", function () {
      // Closed for good (the process's streams are all taken, or the session ended): poll instead.
      if (stream.readyState === EventSource.CLOSED) { poll(); }
    });
    document.body.dataset.liveMode = "stream";
  }

  function composer() {
    var form = document.querySelector("form.composer");
    var text = form && form.querySelector("textarea");
    var counter = document.getElementById("counter");
    if (!text || !counter) { return; }
    var csrf = form.querySelector("input[name=csrf]").value;
    var timer = null;
    function show(counts) {
      counter.textContent = counts.label;
      counter.classList.toggle("warn", counts.encoding === "UCS-2");
      counter.dataset.segments = counts.segments;
      counter.dataset.encoding = counts.encoding;
      if (counts.encoding === "UCS-2") {
        var warning = document.createElement("span");
        warning.className = "ucs2";
        warning.textContent = " " + counter.dataset.ucs2;
        counter.appendChild(warning);
      }
    }
    function count() {
      fetch(form.dataset.segments, {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify({ text: text.value })
      }).then(function (response) { return response.ok ? response.json() : null; })
        .then(function (counts) { if (counts) { show(counts); } })
        .catch(function () {});
    }
    text.addEventListener("input", function () {
      window.clearTimeout(timer);
      timer = window.setTimeout(count, 120);
    });
    count();
  }

  function oneSubmitEach() {
    document.addEventListener("submit", function (event) {
      var button = event.target.querySelector("button[type=submit]");
      if (button) { window.setTimeout(function () { button.disabled = true; }, 0); }
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    live();
    composer();
    oneSubmitEach();
  });
}());
