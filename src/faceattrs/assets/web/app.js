// faceattrs web page: send each chosen or dropped photo to POST /analyze and draw the
// answer (numbered boxes, labels, probability bars, age, Grad-CAM overlays).
"use strict";

const $ = (sel) => document.querySelector(sel);
let limits = null;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function mb(bytes) {
  return (bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1) + " MB";
}

async function loadModel() {
  try {
    const r = await fetch("/model");
    const m = await r.json();
    limits = m.limits;
    const name = (m.source || "bundled model").split("/").filter(Boolean).slice(-1)[0];
    const epoch = m.checkpoint && m.checkpoint.epoch !== undefined ? ` (epoch ${m.checkpoint.epoch})` : "";
    const parts = [`model: ${name}${epoch}`, `heads: ${Object.keys(m.heads).join(", ")}`];
    parts.push(m.age ? `age bins: ${m.age.bins.join(", ")}` : "no age model");
    if (m.input) parts.push(`faces: ${m.input.size}x${m.input.size} ${m.input.channels === 3 ? "colour" : "grayscale"}`);
    const val = (m.metrics && m.metrics.validation) || {};
    const f1 = Object.entries(val)
      .filter(([, v]) => typeof v.macro_f1 === "number")
      .map(([h, v]) => `${h} ${v.macro_f1.toFixed(2)}`);
    if (f1.length) parts.push(`validation macro-F1: ${f1.join(", ")}`);
    const mean = m.metrics && m.metrics.validation_mean_macro_f1;
    if (!f1.length && mean) parts.push(`validation mean macro-F1: ${mean.value.toFixed(3)}`);
    $("#model-info").textContent = parts.join(" · ");
    $("#limits").textContent =
      `JPEG, PNG, WebP, BMP, TIFF or GIF; up to ${mb(limits.max_upload_bytes)} and ` +
      `${(limits.max_pixels / 1e6).toFixed(0)} megapixels each.`;
  } catch (e) {
    $("#model-info").textContent = "could not read /model: is the server running?";
  }
}

function bars(probs, top) {
  const box = el("div", "bars");
  for (const [name, p] of Object.entries(probs)) {
    const row = el("div", "bar" + (name === top ? " top" : ""));
    row.append(el("span", "name", name));
    const track = el("span", "track");
    const fill = el("span", "fill");
    fill.style.width = (100 * p).toFixed(1) + "%";
    fill.style.display = "block";
    track.append(fill);
    row.append(track, el("span", "p", p.toFixed(2)));
    box.append(row);
  }
  return box;
}

function headBlock(title, pred) {
  const div = el("div", "head");
  const t = el("div", "head-title", `${title}: `);
  t.append(el("b", null, pred.label), ` ${pred.probabilities[pred.label].toFixed(2)}`);
  div.append(t, bars(pred.probabilities, pred.label));
  return div;
}

function ageBlock(age) {
  const div = el("div", "head");
  let text = `${Math.round(age.value)} years (most likely bin ${age.bin})`;
  if (Array.isArray(age.interval) && age.interval.length === 2) {
    // an end the calibration could not bound comes as null
    const [lo, hi] = age.interval.map((v) => (v === null ? "?" : v));
    text = `${Math.round(age.value)} years, interval ${lo}–${hi} (bin ${age.bin})`;
  }
  const t = el("div", "head-title age", "Age: ");
  t.append(el("b", null, text));
  div.append(t, bars(age.bin_probabilities, age.bin));
  return div;
}

function faceBlock(rec) {
  const div = el("div", "face");
  div.dataset.face = rec.face;
  const h = el("h3");
  h.append(el("span", "num", String(rec.face)), `Face ${rec.face}`);
  const how = rec.detection === "detected" ? `detector score ${rec.score}` : rec.detection;
  h.append(el("span", "status", ` (${how})`));
  div.append(h, headBlock("Gender", rec.gender), headBlock("Ethnicity", rec.ethnicity));
  if (rec.age) div.append(ageBlock(rec.age));
  if (rec.explain) {
    const img = el("img", "cam");
    img.src = rec.explain;
    img.alt = `Grad-CAM of face ${rec.face}: the face, then where the gender and ethnicity heads looked`;
    div.append(img);
  }
  return div;
}

function drawBoxes(photo, img, faces) {
  const place = () => {
    const W = img.naturalWidth, H = img.naturalHeight;
    if (!W || !H) return;
    for (const rec of faces) {
      const [x, y, w, h] = rec.box;
      const b = el("div", "face-box" + (y / H < 0.08 ? " low" : ""));
      b.style.left = (100 * x / W) + "%";
      b.style.top = (100 * y / H) + "%";
      b.style.width = (100 * w / W) + "%";
      b.style.height = (100 * h / H) + "%";
      b.append(el("span", null, `${rec.face}: ${rec.gender.label}, ${rec.ethnicity.label}` +
        (rec.age ? `, ${Math.round(rec.age.value)}` : "")));
      photo.append(b);
    }
  };
  if (img.complete && img.naturalWidth) place(); else img.addEventListener("load", place, { once: true });
}

function fail(card, message) {
  card.querySelector(".status").textContent = "";
  const body = card.querySelector(".body");
  body.querySelector(".faces").replaceChildren(el("p", "error", message));
  card.classList.add("failed");
}

async function analyse(file) {
  const card = el("article", "card");
  const title = el("h2", null, file.name + " ");
  const status = el("span", "status", "analysing…");
  title.append(status);
  const body = el("div", "body");
  const photo = el("div", "photo");
  const img = el("img");
  img.alt = file.name;
  const faces = el("div", "faces");
  body.append(photo, faces);
  card.append(title, body);
  $("#results").prepend(card);
  if (file.type.startsWith("image/")) {
    img.src = URL.createObjectURL(file);
    img.onerror = () => img.remove();
    photo.append(img);
  }
  if (limits && file.size > limits.max_upload_bytes) {
    return fail(card, `${file.name} is ${mb(file.size)}: over the upload limit of ${mb(limits.max_upload_bytes)} (not sent).`);
  }
  const form = new FormData();
  form.append("file", file, file.name);
  const url = "/analyze" + ($("#explain").checked ? "?explain=1" : "");
  for (let attempt = 0; ; attempt++) {
    let r;
    try {
      r = await fetch(url, { method: "POST", body: form });
    } catch (e) {
      return fail(card, "could not reach the server (is it still running?)");
    }
    let data = null;
    try { data = await r.json(); } catch (e) { /* not JSON */ }
    if (r.status === 503 && attempt < 5) {
      const wait = Number(r.headers.get("Retry-After") || 1);
      status.textContent = `server busy, retrying in ${wait} s…`;
      await new Promise((ok) => setTimeout(ok, 1000 * wait));
      continue;
    }
    if (!r.ok) {
      const msg = data && data.error ? data.error : `${r.status} ${r.statusText}`;
      return fail(card, `Error ${r.status}: ${msg}`);
    }
    const result = data.images[0];
    status.textContent = `${result.faces.length} face${result.faces.length === 1 ? "" : "s"} · ${data.ms} ms`;
    if (!result.faces.length) {
      faces.append(el("p", "reason", `No face: ${result.reason || "no face found"}.`));
      return;
    }
    drawBoxes(photo, img, result.faces);
    for (const rec of result.faces) faces.append(faceBlock(rec));
    return;
  }
}

function handle(files) {
  const list = Array.from(files || []);
  if (!list.length) return;
  $("#notice").textContent = `${list.length} photo${list.length === 1 ? "" : "s"} sent.`;
  list.forEach(analyse);
}

function setup() {
  const drop = $("#drop");
  $("#file").addEventListener("change", (e) => { handle(e.target.files); e.target.value = ""; });
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => handle(e.dataTransfer.files));
  window.addEventListener("dragover", (e) => e.preventDefault());
  window.addEventListener("drop", (e) => e.preventDefault());
  loadModel();
}

setup();
