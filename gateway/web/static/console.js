// Live updates (server-sent events) and confirmations. Every page reads without this file.
"use strict";
document.addEventListener("DOMContentLoaded", () => {
  const live = document.getElementById("live");
  if (live && live.dataset.stream && window.EventSource) {
    const source = new EventSource(live.dataset.stream);
    source.addEventListener("live", (event) => {
      const open = new Set([...live.querySelectorAll("details[open] > summary")].map((s) => s.textContent));
      live.innerHTML = event.data;
      live.querySelectorAll("details > summary").forEach((s) => {
        if (open.has(s.textContent)) s.parentElement.open = true;
      });
      live.dispatchEvent(new CustomEvent("updated"));
    });
  }
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
