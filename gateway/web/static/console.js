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
  // the press desk: the preview follows the form as it is typed (the same server-side rendering)
  const compose = document.querySelector("form.compose");
  if (compose && window.fetch) {
    let timer = null;
    compose.addEventListener("input", () => {
      clearTimeout(timer);
      timer = setTimeout(async () => {
        const data = new FormData(compose);
        data.set("action", "preview");
        const response = await fetch(compose.getAttribute("action"), { method: "POST", body: data, credentials: "same-origin" });
        const page = new DOMParser().parseFromString(await response.text(), "text/html");
        for (const selector of ["section.previews", "p.error[role=alert]"]) {
          const fresh = page.querySelector(selector);
          const old = document.querySelector(selector);
          if (old && fresh) old.replaceWith(fresh);
          else if (old) old.remove();
          else if (fresh) compose.after(fresh);
        }
      }, 600);
    });
  }
  document.querySelectorAll("form[data-confirm]").forEach((form) => {
    form.addEventListener("submit", (event) => {
      if (!window.confirm(form.dataset.confirm)) event.preventDefault();
    });
  });
});
