// One job: status, actions, images, parameters, timings, and the CLI line that resubmits it.
"use strict";

const jobId = decodeURIComponent(location.pathname.split("/").pop());
document.getElementById("job-id").textContent = jobId;

function rows(table, pairs) {
  document.querySelector(`#${table} tbody`).replaceChildren(...pairs.filter(([, v]) => v !== null && v !== undefined)
    .map(([k, v]) => el("tr", {}, el("th", {}, k), el("td", {}, v))));
}

async function refresh() {
  const r = await api(`/v1/jobs/${encodeURIComponent(jobId)}`);
  const job = r.job;
  const status = document.getElementById("status");
  status.className = `status ${r.status}`; status.textContent = r.status; status.dataset.status = r.status;
  document.getElementById("actions").replaceChildren(...actionButtons(r, made => {
    if (made && made.job_id) location.href = `/jobs/${made.job_id}`; else refresh();
  }));
  const waiting = r.status === "queued" && r.position !== null && r.position !== undefined
    ? `${r.position} ahead` + (r.eta_seconds !== null ? ` · done in ~${Math.round(r.eta_seconds)} s` : "") : "";
  document.getElementById("progress").replaceChildren(r.status === "running" ? progressBar(r) : waiting);
  const images = document.getElementById("images");
  if (images.childElementCount !== r.image_urls.length) {
    images.replaceChildren(...r.image_urls.map((url, i) => el("figure", {},
      el("a", { href: url }, el("img", { src: url, alt: `image ${i}` })),
      el("figcaption", {}, `seed ${r.images[i].seed} · ${r.images[i].width}×${r.images[i].height} · ${r.images[i].uri}`))));
  }
  document.getElementById("cli").textContent = r.cli;
  if (job.webhook_url && ["succeeded", "failed", "cancelled"].includes(r.status)) showWebhook();
  rows("parameters", [
    ["model", job.model], ["prompt", job.prompt], ["negative", job.negative_prompt || "–"],
    ["LoRAs", loraStack(job)], ["sampler", job.sampler], ["steps", job.steps], ["CFG", job.cfg_scale],
    ["size", `${job.width}×${job.height}`], ["seed", job.seed], ["images", job.num_images],
    ["priority", job.priority], ["batch", el("a", { href: `/batches/${job.batch_id}` }, job.batch_id)],
    ["tags", Object.entries(job.tags).map(([k, v]) => `${k}=${v}`).join(", ") || "–"],
    ["retry of", r.retry_of ? el("a", { href: `/jobs/${r.retry_of}` }, r.retry_of) : null],
  ]);
  const t = r.timings;
  rows("timings", [
    ["submitted", new Date(r.submitted_at).toLocaleString()],
    ["started", r.started_at ? new Date(r.started_at).toLocaleString() : "–"],
    ["finished", r.finished_at ? new Date(r.finished_at).toLocaleString() : "–"],
    ["worker", r.worker || "–"], ["attempts", r.attempts], ["queue", r.queue],
    ["queue wait", seconds(t.queue_wait)], ["pipeline load", seconds(t.pipeline_load)],
    ["LoRA load", `${seconds(t.lora_load)}` + (t.lora_hits == null ? "" : ` (${t.lora_hits} hits, ${t.lora_misses} misses)`)],
    ["LoRA apply", seconds(t.lora_apply)], ["sampling", seconds(t.sampling)], ["restore", seconds(t.restore)],
    ["upload", seconds(t.upload)], ["total", seconds(t.total)],
  ]);
  document.getElementById("problems").replaceChildren(
    ...(r.error ? [el("h2", {}, "Error"), el("p", { class: "error", id: "error" }, r.error)] : []),
    ...(r.warnings.length ? [el("h2", {}, "Warnings"), el("ul", {}, r.warnings.map(w => el("li", { class: "warning" }, w)))] : []));
}

document.getElementById("copy").addEventListener("click", async () => {
  const text = document.getElementById("cli").textContent;
  try { await navigator.clipboard.writeText(text); document.getElementById("copy").textContent = "copied"; }
  catch { const range = document.createRange(); range.selectNodeContents(document.getElementById("cli"));
          getSelection().removeAllRanges(); getSelection().addRange(range); }
});
// The job's webhook event: its state and every delivery attempt.
async function showWebhook() {
  let event;
  try { event = await api(`/v1/jobs/${encodeURIComponent(jobId)}/webhook`); } catch { return; }
  const attempts = event.attempts.map(a => `${new Date(a.at * 1000).toLocaleTimeString()} ${a.status ?? "–"} ${a.error ?? "ok"}`);
  rows("webhook", [["url", event.url], ["state", event.state], ["attempts", attempts.join(" · ") || "none yet"]]);
}

live(refresh, `job=${encodeURIComponent(jobId)}`);
