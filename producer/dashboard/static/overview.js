// The overview: counts, queues, throughput, workers and the jobs table, kept live.
"use strict";

const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const PAGE = 50;
let offset = 0;
const filters = document.getElementById("filters");

function renderCounts(counts) {
  document.getElementById("counts").replaceChildren(...STATUSES.map(s =>
    el("div", { class: "card", "data-count": s }, el("b", { class: `status ${s}` }, counts[s] ?? 0), s)));
}

function renderQueues(queues) {
  document.querySelector("#queues tbody").replaceChildren(...queues.map(q => el("tr", { "data-model": q.model },
    el("td", {}, q.model),
    el("td", { class: "depth" }, q.depth, q.depth ? el("span", { class: "muted" }, ` (high ${q.by_priority["0"]}, normal ${q.by_priority["3"]}, low ${q.by_priority["6"]})`) : null),
    el("td", {}, q.workers.length ? q.workers.join(", ") : el("span", { class: "warning" }, "no live worker"),
       q.stale_workers.length ? el("span", { class: "muted" }, ` · stale: ${q.stale_workers.join(", ")}`) : null))));
  const select = filters.elements.model;
  const chosen = select.value;
  select.replaceChildren(el("option", { value: "" }, "any"), ...queues.map(q => el("option", { value: q.model, selected: q.model === chosen }, q.model)));
}

function renderThroughput(series, total) {
  const svg = document.getElementById("throughput");
  const peak = Math.max(1, ...series.map(p => p.images));
  const width = 600 / series.length;
  svg.replaceChildren(...series.map((p, i) => {
    const h = 110 * p.images / peak;
    const rect = document.createElementNS("http://www.w3.org/2000/svg", "rect");
    rect.setAttribute("x", i * width + 1); rect.setAttribute("width", width - 2);
    rect.setAttribute("y", 115 - h); rect.setAttribute("height", h);
    const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
    title.textContent = `${p.images} images at ${new Date(p.minute * 60000).toLocaleTimeString()}`;
    rect.append(title);
    return rect;
  }));
  document.getElementById("throughput-total").textContent = `${total} images in the last hour`;
}

function renderWorkers(workers) {
  const box = document.getElementById("workers");
  if (!workers.length) { box.replaceChildren(el("p", { class: "muted" }, "No worker has reported. Start one with: lorafleet worker --models NAME")); return; }
  box.replaceChildren(...workers.map(w => el("div", { class: `worker ${w.liveness}`, "data-worker": w.name },
    el("h3", {}, w.name, " ", el("span", { class: "muted" }, w.liveness === "alive" ? "" : `${w.liveness} (${Math.round(w.age)} s)`)),
    el("dl", {},
      el("dt", {}, "device"), el("dd", {}, `${w.device} · ${bytes(w.device_memory_used)} of ${bytes(w.device_memory_total)}`),
      el("dt", {}, "serves"), el("dd", {}, w.models.join(", ")),
      el("dt", {}, "hot"), el("dd", {}, w.hot_pipelines.join(", ") || "–"),
      el("dt", {}, "LoRAs"), el("dd", {}, w.cached_loras.join(", ") || "–"),
      el("dt", {}, "now"), el("dd", {}, w.current_job ? el("a", { href: `/jobs/${w.current_job}` }, `${w.current_job.slice(0, 8)} step ${w.current_step}/${w.current_total}`) : "idle"),
      el("dt", {}, "jobs"), el("dd", {}, `${w.jobs_done} done, ${w.jobs_failed} failed, ${w.jobs_cancelled} cancelled`),
      el("dt", {}, "LoRA cache"), el("dd", {}, w.lora_hit_rate == null ? "–" : `${Math.round(100 * w.lora_hit_rate)}% hits`),
      el("dt", {}, "switch p50"), el("dd", {}, w.switch_p50 == null ? "–" : `${(1000 * w.switch_p50).toFixed(1)} ms`)))));
}

function timingsText(t) {
  return `load ${seconds(t.pipeline_load)} · lora ${seconds(t.lora_load)} · apply ${seconds(t.lora_apply)} · ` +
         `sample ${seconds(t.sampling)} · restore ${seconds(t.restore)} · upload ${seconds(t.upload)}`;
}

function renderJobs(page) {
  document.querySelector("#jobs tbody").replaceChildren(...page.jobs.map(r => el("tr", { "data-job": r.job_id, "data-status": r.status },
    el("td", {}, el("a", { href: `/jobs/${r.job_id}` }, r.job_id.slice(0, 8)),
       r.image_urls.length ? el("a", { href: `/jobs/${r.job_id}` }, el("img", { class: "thumb", src: r.image_urls[0], alt: "thumbnail", loading: "lazy" })) : null),
    el("td", {}, statusBadge(r.status)),
    el("td", {}, r.status === "running" ? progressBar(r) : `${r.progress.step}/${r.progress.total}`),
    el("td", {}, r.job.model),
    el("td", {}, loraStack(r.job)),
    el("td", {}, `${r.job.sampler} ${r.job.steps} steps, CFG ${r.job.cfg_scale}`),
    el("td", { class: "muted" }, timingsText(r.timings)),
    el("td", {}, r.worker || "–"),
    el("td", { class: "error" }, r.error && r.status === "failed" ? r.error : ""),
    el("td", {}, actionButtons(r, refresh)))));
  const last = Math.min(page.offset + page.jobs.length, page.total);
  document.getElementById("page-info").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total}` : "no jobs";
  document.getElementById("prev").disabled = page.offset === 0;
  document.getElementById("next").disabled = last >= page.total;
}

async function refresh() {
  const params = new URLSearchParams({ offset, limit: PAGE });
  for (const name of ["status", "model", "batch"]) if (filters.elements[name].value) params.set(name, filters.elements[name].value.trim());
  const [summary, page] = await Promise.all([api("/v1/summary"), api("/v1/jobs?" + params)]);
  renderCounts(summary.counts);
  renderQueues(summary.queues);
  renderThroughput(summary.throughput, summary.images_last_hour);
  renderWorkers(summary.workers);
  renderJobs(page);
}

filters.addEventListener("change", () => { offset = 0; refresh(); });
filters.addEventListener("submit", event => { event.preventDefault(); offset = 0; refresh(); });
document.getElementById("prev").addEventListener("click", () => { offset = Math.max(0, offset - PAGE); refresh(); });
document.getElementById("next").addEventListener("click", () => { offset += PAGE; refresh(); });
live(refresh, "");
