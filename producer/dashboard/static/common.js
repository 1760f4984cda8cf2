// Shared by every page: fetching the API, building elements safely, small formatters.
"use strict";

const DEBOUNCE_MS = 250;
const FALLBACK_MS = 15000;

async function api(path, options = {}) {
  const response = await fetch(path, { credentials: "same-origin", ...options });
  if (response.status === 401) {
    location.href = "/login?next=" + encodeURIComponent(location.pathname);
    throw new Error("login required");
  }
  const body = response.headers.get("content-type")?.includes("json") ? await response.json() : null;
  if (!response.ok) {
    const detail = Array.isArray(body?.detail) ? body.detail.map(p => `${p.field}: ${p.message}`).join("; ") : body?.detail;
    throw new Error(detail || `${response.status} ${response.statusText}`);
  }
  return body;
}

// el("td", {class: "x"}, "text", child): text is always text, never HTML.
function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : value);
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function statusBadge(status) { return el("span", { class: `status ${status}`, "data-status": status }, status); }

function progressBar(record) {
  const { step, total } = record.progress;
  const percent = total ? Math.round(100 * step / total) : 0;
  return el("div", { class: "bar", title: `step ${step} of ${total}`, role: "progressbar",
                     "aria-valuenow": step, "aria-valuemax": total },
            el("span", { style: `width:${percent}%` }));
}

function loraStack(job) {
  return job.loras.map(l => `${l.name}:${l.weight}` + (l.text_encoder_weight != null ? `/${l.text_encoder_weight}` : "")).join(" + ") || "–";
}

function seconds(value) { return value == null ? "–" : value.toFixed(2); }
function bytes(value) {
  if (value == null) return "–";
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (value >= 1024 && i < units.length - 1) { value /= 1024; i++; }
  return `${value.toFixed(i ? 1 : 0)} ${units[i]}`;
}

// Calls that change state say JSON: the API refuses them otherwise (no cross-site form posts).
const JSON_CALL = { "Content-Type": "application/json" };
async function cancelJob(id) { await api(`/v1/jobs/${id}`, { method: "DELETE", headers: JSON_CALL }); }
async function retryJob(id) { return api(`/v1/jobs/${id}/retry`, { method: "POST", headers: JSON_CALL }); }

function actionButtons(record, after) {
  const buttons = [];
  if (record.status === "queued" || record.status === "running") {
    buttons.push(el("button", { type: "button", class: "cancel", onclick: async () => { await cancelJob(record.job_id); after(); } }, "cancel"));
  }
  if (record.status === "failed" || record.status === "cancelled") {
    buttons.push(el("button", { type: "button", class: "retry", onclick: async () => { const made = await retryJob(record.job_id); after(made); } }, "retry"));
  }
  return buttons;
}

// Live pages: refresh at once, then whenever /v1/events says a job of the page changed (a
// burst of events is one refresh), and every FALLBACK_MS for what has no events (workers).
function live(refresh, query) {
  let queued = false;
  const run = async () => {
    try {
      await refresh();
      document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (error) {
      document.getElementById("updated").textContent = "⚠ " + error.message;
    }
  };
  const soon = () => {
    if (queued) return;
    queued = true;
    setTimeout(() => { queued = false; run(); }, DEBOUNCE_MS);
  };
  run();
  const events = new EventSource("/v1/events" + (query ? `?${query}` : ""));
  events.addEventListener("job", soon);
  events.addEventListener("open", soon);  // after a reconnect, catch up
  setInterval(run, FALLBACK_MS);
}
