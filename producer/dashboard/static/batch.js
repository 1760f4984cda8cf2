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
// A sweep: its jobs laid out by axes (X columns, Y rows, one table per Z value), and the
// labelled grid pages once the last job has ended.
function sweepTables(batch) {
  const [x, y, z] = [batch.sweep[0], batch.sweep[1] || { labels: [""] }, batch.sweep[2] || { labels: [""] }];
  const cell = {};
  for (const job of batch.jobs) {
    const t = job.job.tags;
    cell[`${t["sweep.x.index"] || 0},${t["sweep.y.index"] || 0},${t["sweep.z.index"] || 0}`] = job;
  }
  return z.labels.map((zLabel, k) => el("table", { class: "axes", "data-page": k },
    el("caption", {}, zLabel ? `${batch.sweep[2].axis}: ${zLabel}` : ""),
    el("thead", {}, el("tr", {}, el("th", {}, y.axis ? `${y.axis} \\ ${x.axis}` : x.axis),
      ...x.labels.map(label => el("th", {}, label)))),
    el("tbody", {}, ...y.labels.map((yLabel, j) => el("tr", {}, el("th", {}, yLabel),
      ...x.labels.map((_, i) => {
        const job = cell[`${i},${j},${k}`];
        if (!job) return el("td", {}, "–");
        const inner = job.image_urls.length ? el("img", { src: job.image_urls[0], alt: job.job.prompt, class: "thumb" })
                                            : statusBadge(job.status);
        return el("td", { "data-job": job.job_id, "data-status": job.status }, el("a", { href: `/jobs/${job.job_id}` }, inner));
      }))))));
}

const plainRefresh = refresh;
async function refreshSweep() {
  await plainRefresh();
  const batch = await api(`/v1/batches/${encodeURIComponent(batchId)}`);
  if (!batch.sweep) return;
  const signature = JSON.stringify(batch.counts) + batch.grids.length;
  const axes = document.getElementById("axes");
  if (axes.dataset.signature !== signature) {
    axes.replaceChildren(...sweepTables(batch));
    axes.dataset.signature = signature;
    document.getElementById("grids").replaceChildren(...batch.grids.map((url, z) =>
      el("figure", {}, el("a", { href: url }, el("img", { src: url, alt: `grid page ${z}`, class: "grid" })))));
  }
}
live(refreshSweep, `batch=${encodeURIComponent(batchId)}`);
