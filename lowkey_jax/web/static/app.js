// lowkey-jax web page: upload to POST /api/cloak, poll /api/jobs, show results.
// Plain JavaScript, no libraries, nothing fetched from anywhere but this server.
"use strict";

const $ = (sel, root = document) => root.querySelector(sel);
const STAGES = {
  reading: "reading the photo",
  detecting: "detecting faces",
  compiling: "compiling the attack (first photo of this size; once per session)",
  cloaking: "cloaking",
  checking: "checking against each recogniser",
  writing: "writing the cloaked photo",
};
const NAMES = { dlib: "dlib ResNet", facenet: "FaceNet", sface: "SFace", facenet128: "FaceNet-128", "arcface-mobilenet": "ArcFace MobileNet" };
const QUALITY = {
  face_psnr: ["face PSNR", "dB on the face, higher = closer to the original"],
  face_colour_difference: ["face colour difference", "CIEDE2000 mean on the face; about 1 = just noticeable"],
  face_colour_difference_p99: ["face colour difference, 99th pct", "CIEDE2000 of the most changed 1% of face pixels"],
  face_lpips: ["face LPIPS", "perceptual difference on the face, lower = less visible"],
  face_max_change: ["face max change", "largest change of any pixel value, in 1/255"],
  lpips: ["LPIPS", "whole photo: perceptual difference, lower = less visible"],
  psnr: ["PSNR", "whole photo: dB, higher = closer to the original"],
  distance: ["feature distance", "the attack's objective, higher = further from you"],
};
const ZOOM_MAX = 224; // px of each 1:1 face crop

let chosen = [];
let info = null;
const batches = []; // every batch sent from this page, oldest first
let timer = null;
const cards = new Map();

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "n/a";
  if (typeof x !== "number") return String(x);
  return Number.isInteger(x) ? String(x) : x.toFixed(digits);
}

function say(text) { $("#message").textContent = text || ""; }

async function loadInfo() {
  const r = await fetch("/api/info");
  info = await r.json();
  const box = $("#levels");
  for (const [name, p] of Object.entries(info.levels)) {
    const label = document.createElement("label");
    const input = document.createElement("input");
    input.type = "radio"; input.name = "level"; input.value = name;
    input.checked = name === info.default_level;
    label.append(input, ` ${name} `);
    const small = document.createElement("small");
    small.textContent = p.epsilon ? `(budget ${Math.round(p.epsilon * 255)}/255)` : `(${p.steps} steps, no budget)`;
    label.append(small);
    box.append(label);
  }
  const L = info.limits;
  $("#limits").textContent =
    `Up to ${L.max_files} photos at a time, ${Math.round(L.max_file_bytes / 1048576)} MiB and ` +
    `${Math.round(L.max_pixels / 1e6)} megapixels each. Low: subtlest, beats the recognisers it was ` +
    `made against but not reliably others; mid: keeps eye colour and skin tone; up close, brows and lips are ` +
    `subtly reshaped on small faces; protected against the recognisers we test it on; high: strongest (no recogniser we test matched), visibly alters faces; ` +
    `reference: the LowKey authors' setting. Cloaked photos keep their size, format and ` +
    `colour profile; EXIF and GPS are removed. Files are deleted after download or ${Math.round(L.expire_s / 60)} minutes.`;
}

function choose(files) {
  chosen = Array.from(files);
  $("#count").textContent = chosen.length ? `${chosen.length} photo${chosen.length > 1 ? "s" : ""}` : "";
  $("#go").disabled = chosen.length === 0;
  say(chosen.length > info.limits.max_files ? `At most ${info.limits.max_files} photos per request; the first ${info.limits.max_files} will be sent.` : "");
}

async function start() {
  const files = chosen.slice(0, info.limits.max_files);
  if (!files.length) return;
  const form = new FormData();
  const level = $("input[name=level]:checked");
  form.append("level", level ? level.value : info.default_level);
  for (const f of files) form.append("file", f, f.name);
  $("#go").disabled = true;
  say("Uploading...");
  let r, body;
  try {
    r = await fetch("/api/cloak", { method: "POST", body: form });
    body = await r.json();
  } catch (e) {
    say(`Upload failed: ${e}`);
    $("#go").disabled = false;
    return;
  }
  if (!body.jobs) { say(body.error || `Upload refused (${r.status})`); $("#go").disabled = false; return; }
  say("");
  batches.push(body.batch);
  $("#progress").hidden = false;
  for (const j of body.jobs) update(j);
  chosen = []; $("#files").value = ""; $("#count").textContent = "";
  poll();
}

async function poll() {
  clearTimeout(timer);
  if (!batches.length) return;
  try {
    const jobs = [];
    for (const b of batches) {
      const r = await fetch(`/api/jobs?batch=${encodeURIComponent(b)}`);
      const body = await r.json();
      jobs.push(...(body.jobs || []));
    }
    for (const j of jobs) update(j);
    overall(jobs);
    if (jobs.some((j) => j.state === "queued" || j.state === "running")) {
      timer = setTimeout(poll, 600);
    } else {
      $("#go").disabled = chosen.length === 0;
    }
  } catch (e) {
    timer = setTimeout(poll, 2000);
  }
}

function overall(jobs) {
  const done = jobs.filter((j) => j.state !== "queued" && j.state !== "running").length;
  let frac = done;
  for (const j of jobs) if (j.state === "running" && j.total) frac += 0.9 * (j.step / j.total);
  $("#overall-bar").max = Math.max(jobs.length, 1);
  $("#overall-bar").value = frac;
  const count = (state) => jobs.filter((j) => j.state === state).length;
  const parts = [["cloaked", "cloaked"], ["no_face", "without a face"], ["failed", "failed"], ["cancelled", "cancelled"]]
    .filter(([s]) => count(s)).map(([s, label]) => `${count(s)} ${label}`);
  $("#overall-text").textContent = `${done} of ${jobs.length} done` + (parts.length ? ` (${parts.join(", ")})` : "");
  const ready = [...new Set(jobs.filter((j) => j.available).map((j) => j.batch))];
  $("#zip").hidden = ready.length === 0;
  $("#zip").href = "/api/zip?" + ready.map((b) => `batch=${encodeURIComponent(b)}`).join("&");
}

function stateText(j) {
  switch (j.state) {
    case "queued": return j.queue_position ? `waiting (${j.queue_position} in the queue)` : "waiting";
    case "running": {
      const s = STAGES[j.stage] || j.stage || "starting";
      return j.stage === "cloaking" && j.total ? `${s}: step ${j.step} of ${j.total}` : s;
    }
    case "cloaked": return "cloaked";
    case "no_face": return "no face found";
    case "cancelled": return "cancelled";
    default: return "failed";
  }
}

function update(j) {
  let card = cards.get(j.id);
  if (!card) {
    card = $("#photo-template").content.firstElementChild.cloneNode(true);
    card.dataset.id = j.id;
    $(".name", card).textContent = j.name;
    $(".cancel", card).addEventListener("click", () => cancel(j.id));
    $("#photos").append(card);
    cards.set(j.id, card);
  }
  card.className = `photo ${j.state}` + (j.state !== "queued" && j.state !== "running" ? " done" : "");
  $(".state", card).textContent = stateText(j);
  const bar = $(".bar", card);
  if (j.state === "running" && j.stage === "cloaking" && j.total) { bar.max = j.total; bar.value = j.step; }
  else if (j.state === "running") bar.removeAttribute("value"); // indeterminate
  else bar.value = 0;
  const err = $(".error", card);
  err.hidden = !j.error; err.textContent = j.error || "";
  const dl = $(".download", card);
  dl.hidden = !j.available;
  if (j.available) { dl.href = `/api/jobs/${j.id}/download`; dl.setAttribute("download", j.output || ""); }
  if (j.state === "cloaked" && j.result && !card.dataset.shown) {
    card.dataset.shown = "1";
    showResult(card, j);
  }
}

async function cancel(id) {
  await fetch(`/api/jobs/${id}/cancel`, { method: "POST" });
  poll();
}

function showResult(card, j) {
  const res = j.result;
  const before = `/api/jobs/${j.id}/original`, after = `/api/jobs/${j.id}/cloaked`;
  $(".before", card).src = before;
  $(".after", card).src = after;
  const clip = $(".before-clip", card), divider = $(".divider", card), slider = $(".slider", card);
  const split = (v) => { clip.style.clipPath = `inset(0 ${100 - v}% 0 0)`; divider.style.left = `${v}%`; };
  slider.addEventListener("input", () => split(Number(slider.value)));
  split(Number(slider.value));
  const toggle = $(".toggle", card);
  toggle.addEventListener("click", () => {
    const showOriginal = toggle.getAttribute("aria-pressed") !== "true";
    toggle.setAttribute("aria-pressed", String(showOriginal));
    toggle.textContent = showOriginal ? "Show cloaked" : "Show original";
    slider.value = showOriginal ? 100 : 0;
    split(Number(slider.value));
  });

  // Per recogniser: similarity per face, threshold, verdict.
  const tbody = $(".recognizers tbody", card);
  let still = [];
  for (const [name, r] of Object.entries(res.recognizers || {})) {
    const tr = document.createElement("tr");
    const cells = [NAMES[name] || name, r.similarity.map((s) => fmt(s)).join(", "), r.rule || fmt(r.threshold)];
    cells.forEach((c, i) => { const td = document.createElement("td"); td.textContent = c; if (i) td.className = "num"; tr.append(td); });
    const td = document.createElement("td");
    td.textContent = r.verdict;
    td.className = "verdict " + (r.matched.some(Boolean) ? "matched" : "protected");
    if (r.matched.some(Boolean)) still.push(NAMES[name] || name);
    tr.append(td);
    tbody.append(tr);
  }
  $(".summary", card).textContent = Object.keys(res.recognizers || {}).length === 0
    ? "Similarity was not measured."
    : still.length ? `Still matched by ${still.join(", ")}: try a higher level.`
      : "None of the recognisers would match this photo to the original any more.";

  // Quality: every numeric field of the result (per-face lists shown per face below).
  const dl = $(".quality", card);
  const perFace = {};
  for (const [key, v] of Object.entries(res.quality || {})) {
    if (Array.isArray(v)) { perFace[key] = v; continue; }
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    const [label, help] = QUALITY[key] || [key.replace(/_/g, " "), ""];
    dt.textContent = label; dd.textContent = fmt(v);
    if (help) { const small = document.createElement("small"); small.textContent = help; dd.append(" ", small); }
    dl.append(dt, dd);
  }
  const dt = document.createElement("dt"), dd = document.createElement("dd");
  const small = document.createElement("small");
  small.textContent = "including compilation for the first photo of a size";
  dt.textContent = "time"; dd.append(`${fmt(res.seconds, 1)} s `, small);
  dl.append(dt, dd);

  // Faces: a 1:1 crop of the original and the cloaked photo around each face.
  const faces = res.faces || [];
  $(".faces-title", card).textContent = `${faces.length} face${faces.length === 1 ? "" : "s"} found (1:1 pixels: original | cloaked)`;
  const box = $(".faces", card);
  faces.forEach((f, i) => {
    const [x0, y0, x1, y1] = f.box;
    const cx = (x0 + x1) / 2, cy = (y0 + y1) / 2;
    const side = Math.min(ZOOM_MAX, Math.round(Math.max(x1 - x0, y1 - y0) * 1.15));
    const [W, H] = j.size || [1e9, 1e9];
    const w = Math.min(side, W), h = Math.min(side, H);
    const left = Math.max(0, Math.min(W - w, Math.round(cx - w / 2)));
    const top = Math.max(0, Math.min(H - h, Math.round(cy - h / 2)));
    const fig = document.createElement("figure");
    fig.className = "face"; fig.style.margin = "0";
    const pair = document.createElement("div");
    pair.className = "pair";
    for (const url of [before, after]) {
      const z = document.createElement("div");
      z.className = "zoom";
      z.style.width = `${w}px`; z.style.height = `${h}px`;
      z.style.backgroundImage = `url("${url}")`;
      z.style.backgroundPosition = `-${left}px -${top}px`;
      pair.append(z);
    }
    const cap = document.createElement("figcaption");
    const extra = Object.entries(perFace).filter(([, v]) => v.length === faces.length).map(([k, v]) => `${(QUALITY[k] || [k.replace(/_/g, " ")])[0]} ${fmt(v[i], 2)}`);
    const det = res.detected_after && res.detected_after.length ? (res.detected_after[i] ? "still detected as a face" : "no longer detected") : "";
    cap.textContent = [`face ${i + 1}`, ...extra, det].filter(Boolean).join(" · ");
    fig.append(pair, cap);
    box.append(fig);
  });
  $(".result", card).hidden = false;
}

function init() {
  const drop = $("#drop"), input = $("#files");
  input.addEventListener("change", () => choose(input.files));
  for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  drop.addEventListener("drop", (e) => choose(e.dataTransfer.files));
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  $("#go").addEventListener("click", start);
  loadInfo().catch((e) => say(`Cannot reach the lowkey-jax server: ${e}`));
}

init();
