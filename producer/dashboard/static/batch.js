// A batch: its counts and a contact sheet of every image, refreshed as its jobs change.
"use strict";

const batchId = decodeURIComponent(location.pathname.split("/").pop());
document.getElementById("batch-id").textContent = batchId;

async function refresh() {
  const batch = await api(`/v1/batches/${encodeURIComponent(batchId)}`);
  document.getElementById("counts").replaceChildren(...Object.entries(batch.counts).map(([s, n]) =>
    el("div", { class: "card" }, el("b", { class: `status ${s}` }, n), s)));
  const figures = [];
  for (const job of batch.jobs) {
    if (!job.image_urls.length) {
      figures.push(el("figure", { "data-job": job.job_id }, el("a", { href: `/jobs/${job.job_id}` }, statusBadge(job.status)),
                      el("figcaption", {}, `${job.job_id.slice(0, 8)} · ${job.job.prompt}`)));
      continue;
    }
    job.image_urls.forEach((url, i) => figures.push(el("figure", { "data-job": job.job_id },
      el("a", { href: `/jobs/${job.job_id}` }, el("img", { src: url, alt: job.job.prompt, loading: "lazy" })),
      el("figcaption", {}, `${job.job.prompt} · ${loraStack(job.job)} · seed ${job.images[i].seed}`))));
  }
  const sheet = document.getElementById("sheet");
  if (sheet.dataset.signature !== JSON.stringify(batch.images) + JSON.stringify(batch.counts)) {
    sheet.replaceChildren(...figures);
    sheet.dataset.signature = JSON.stringify(batch.images) + JSON.stringify(batch.counts);
  }
}
live(refresh, `batch=${encodeURIComponent(batchId)}`);
