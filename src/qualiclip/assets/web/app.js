// The qualiclip page: sends each picked or dropped image to POST /map and shows its score,
// a sortable table and the quality map over the image. Everything comes from this server.
"use strict";

const state = { limits: null, rows: [], sortKey: "index", sortDir: 1, queue: Promise.resolve() };
const $ = (id) => document.getElementById(id);

function megabytes(bytes) { return (bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1); }

async function loadInfo() {
  try {
    const models = await (await fetch("models")).json();
    const m = models.models[0];
    $("model-name").textContent = m.name;
    $("model-sha").firstElementChild.textContent = m.weights_sha256 || "(not recorded)";
    $("model-device").textContent = `${m.device}, ${m.precision}`;
  } catch (err) {
    $("model-name").textContent = `unavailable (${err})`;
  }
  try {
    const lim = await (await fetch("limits")).json();
    state.limits = lim;
    $("limits").textContent =
      `Limits of this server: up to ${lim.max_files} files at a time; each file at most ` +
      `${megabytes(lim.max_bytes)} MB and ${lim.max_pixels.toLocaleString("en")} pixels ` +
      `(width × height), and at least ${lim.min_size} px on each side.`;
    // Offer only the map kinds this model can draw (an ONNX graph has no dense map).
    const kinds = lim.map_kinds || ["dense", "windows"];
    for (const option of $("kind").options) option.disabled = !kinds.includes(option.value);
    if (!kinds.includes($("kind").value)) $("kind").value = kinds[0];
  } catch (err) {
    $("limits").textContent = `The server's limits could not be read (${err}).`;
  }
}

function addFiles(fileList) {
  let files = Array.from(fileList);
  const max = state.limits ? state.limits.max_files : files.length;
  $("notice").textContent = "";
  if (files.length > max) {
    $("notice").textContent =
      `${files.length - max} of ${files.length} files not sent: the server takes at most ` +
      `${max} files at a time.`;
    files = files.slice(0, max);
  }
  for (const file of files) {
    const row = { index: state.rows.length + 1, name: file.name, file, score: null,
                  pixels: null, width: null, height: null, seconds: null, error: null,
                  status: "waiting", overlay: null, map: null };
    state.rows.push(row);
    state.queue = state.queue.then(() => scoreRow(row));
  }
  render();
}

async function scoreRow(row) {
  row.status = "scoring";
  render();
  const body = new FormData();
  body.append("files", row.file, row.name);
  const started = performance.now();
  try {
    const response = await fetch(`map?kind=${encodeURIComponent($("kind").value)}`,
                                 { method: "POST", body });
    let data = null;
    try { data = await response.json(); } catch (err) { data = null; }
    const result = data && data.results && data.results[0];
    if (result && result.error === null) {
      row.score = result.score;
      row.width = result.width;
      row.height = result.height;
      row.pixels = result.width * result.height;
      row.overlay = result.overlay;
      row.map = result.map;
      const note = result.map_error || result.overlay_error;
      row.status = note ? `scored (${note})` : "scored";
    } else {
      row.error = (result && result.error) || (data && data.detail) ||
        `HTTP ${response.status} ${response.statusText}`;
      row.status = `refused (HTTP ${response.status})`;
    }
  } catch (err) {
    row.error = `no answer from the server: ${err}`;
    row.status = "failed";
  }
  row.seconds = (performance.now() - started) / 1000;
  render();
}

function compare(a, b) {
  const key = state.sortKey;
  let x = a[key], y = b[key];
  if (x === null && y === null) return a.index - b.index;
  if (x === null) return 1;  // rows without a value go last either way
  if (y === null) return -1;
  if (typeof x === "string") return state.sortDir * x.localeCompare(y);
  return state.sortDir * (x - y);
}

function render() {
  const tbody = document.querySelector("#results tbody");
  tbody.replaceChildren();
  for (const row of [...state.rows].sort(compare)) {
    const tr = document.createElement("tr");
    tr.dataset.name = row.name;
    if (row.score !== null) tr.dataset.score = String(row.score);
    const cells = [
      String(row.index),
      row.name,
      row.score === null ? "" : row.score.toFixed(4),
      row.width === null ? "" : `${row.width}×${row.height}`,
      row.seconds === null ? "" : row.seconds.toFixed(2),
      row.error === null ? row.status : row.error,
    ];
    cells.forEach((text, i) => {
      const td = document.createElement("td");
      td.textContent = text;
      if (i === 2) td.className = "score";
      if (i === 5 && row.error !== null) td.className = "error";
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
  }
  for (const th of document.querySelectorAll("#results th[data-key]")) {
    if (th.dataset.key === state.sortKey) {
      th.setAttribute("aria-sort", state.sortDir > 0 ? "ascending" : "descending");
    } else {
      th.removeAttribute("aria-sort");
    }
  }
  renderMaps();
}

function renderMaps() {
  const section = $("maps");
  const shown = new Set(Array.from(section.children, (f) => f.dataset.index));
  for (const row of state.rows) {
    if (row.overlay === null || shown.has(String(row.index))) continue;
    const figure = document.createElement("figure");
    figure.dataset.index = String(row.index);
    figure.dataset.name = row.name;
    const img = document.createElement("img");
    img.className = "map";
    img.alt = `quality map of ${row.name}`;
    img.src = row.overlay;
    const caption = document.createElement("figcaption");
    const m = row.map;
    caption.textContent = `${row.name}: score ${row.score.toFixed(4)}; ${m.kind} map ` +
      `${m.rows}×${m.cols}, from ${m.min.toFixed(3)} to ${m.max.toFixed(3)}`;
    figure.append(img, caption);
    section.appendChild(figure);
  }
}

function setUp() {
  const drop = $("drop");
  $("files").addEventListener("change", (event) => {
    addFiles(event.target.files);
    event.target.value = "";
  });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (event) => { event.preventDefault(); drop.classList.add("over"); });
  }
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    drop.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("clear").addEventListener("click", () => {
    state.rows = [];
    $("maps").replaceChildren();
    $("notice").textContent = "";
    render();
  });
  for (const th of document.querySelectorAll("#results th[data-key]")) {
    th.querySelector("button").addEventListener("click", () => {
      const key = th.dataset.key;
      state.sortDir = state.sortKey === key ? -state.sortDir : (key === "score" ? -1 : 1);
      state.sortKey = key;
      render();
    });
  }
  loadInfo();
}

setUp();
