// qualiclip report: builds the thumbnail grid from the embedded rows, sorts and filters it.
// Thumbnails get their data only as they near the viewport, so 10,000 rows stay usable.
"use strict";
(() => {
  const rows = JSON.parse(document.getElementById("report-data").textContent).rows;
  const grid = document.getElementById("grid");
  const sort = document.getElementById("sort");
  const worst = document.getElementById("worst");
  const below = document.getElementById("below");
  const beside = document.getElementById("beside");
  const shown = document.getElementById("shown");
  const bars = Array.from(document.querySelectorAll("#histogram .bar"));
  const baseName = (p) => p.split(/[\\/]/).pop();

  const observer = new IntersectionObserver((entries) => {
    for (const entry of entries) {
      if (!entry.isIntersecting) continue;
      const fig = entry.target;
      const row = rows[Number(fig.dataset.index)];
      const photo = fig.querySelector("img.photo");
      if (photo && row.t) photo.src = row.t;
      const map = fig.querySelector("img.map");
      if (map && row.m) map.src = row.m;
      observer.unobserve(fig);
    }
  }, { rootMargin: "800px 0px" });

  function figureFor(row, index) {
    const fig = document.createElement("figure");
    fig.className = "thumb";
    fig.dataset.index = String(index);
    fig.dataset.name = baseName(row.p);
    fig.dataset.score = String(row.s);
    fig.title = row.p;
    const pics = document.createElement("div");
    pics.className = "pics";
    if (row.t) {
      const img = document.createElement("img");
      img.className = "photo";
      img.loading = "lazy";
      img.decoding = "async";
      img.width = row.tw;
      img.height = row.th;
      img.alt = baseName(row.p);
      pics.append(img);
    } else {
      pics.append(row.x || "no thumbnail");
    }
    if (row.m) {
      const map = document.createElement("img");
      map.className = "map";
      map.loading = "lazy";
      map.width = row.tw;
      map.height = row.th;
      map.alt = "quality map of " + baseName(row.p);
      pics.append(map);
    }
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = row.s.toFixed(4);
    pics.append(score);
    if (row.n) {
      const note = document.createElement("span");
      note.className = "note";
      note.textContent = "flat map";
      note.title = row.n;
      pics.append(note);
    }
    const caption = document.createElement("figcaption");
    caption.textContent = baseName(row.p) + (row.w ? ` · ${row.w}×${row.h}` : "");
    fig.append(pics, caption);
    return fig;
  }

  const figures = rows.map(figureFor);
  const byScore = rows.map((_, i) => i).sort((a, b) => rows[a].s - rows[b].s || a - b);

  function render() {
    let order = byScore;
    const n = parseInt(worst.value, 10);
    if (n > 0) order = order.slice(0, n);
    const t = parseFloat(below.value);
    if (!Number.isNaN(t)) order = order.filter((i) => rows[i].s <= t);
    if (sort.value === "desc") order = order.slice().reverse();
    if (sort.value === "name") {
      order = order.slice().sort((a, b) => rows[a].p < rows[b].p ? -1 : rows[a].p > rows[b].p ? 1 : 0);
    }
    const fragment = document.createDocumentFragment();
    for (const i of order) fragment.append(figures[i]);
    grid.replaceChildren(fragment);
    for (const i of order) observer.observe(figures[i]);
    shown.textContent = `showing ${order.length} of ${rows.length}`;
    for (const bar of bars) {
      bar.classList.toggle("below", !Number.isNaN(t) && Number(bar.dataset.lo) < t);
    }
  }

  for (const control of [sort, worst, below]) control.addEventListener("input", render);
  if (beside) beside.addEventListener("change", () => grid.classList.toggle("beside", beside.checked));
  render();
  performance.mark("qualiclip-grid");
})();
