// faceattrs web page: send each chosen or dropped photo to POST /analyze and draw the
// answer (numbered boxes, labels, probability bars, age, Grad-CAM overlays).
"use strict";

const $ = (sel) => document.querySelector(sel);
let limits = null;
// the most pixels a photo may have to be previewed here (the browser decodes it whole)
const PREVIEW_PIXELS = 50e6;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function mb(bytes) {
  return (bytes / 1048576).toFixed(bytes < 1048576 ? 2 : 1) + " MB";
}

function megapixels(pixels) {
  return `${+(pixels / 1e6).toFixed(3)} megapixels`;
}

// Width and height from the header of a PNG, JPEG, GIF, BMP or WebP file, without
// decoding a pixel; null for another format or a header that cannot be read.
function headerSize(buf) {
  const b = new Uint8Array(buf);
  const v = new DataView(buf);
  const has = (n) => b.length >= n;
  const ascii = (at, n) => String.fromCharCode(...b.subarray(at, at + n));
  if (has(24) && b[0] === 0x89 && ascii(1, 3) === "PNG") {
    return { w: v.getUint32(16), h: v.getUint32(20) };
  }
  if (has(10) && ascii(0, 4) === "GIF8") {
    return { w: v.getUint16(6, true), h: v.getUint16(8, true) };
  }
  if (has(26) && ascii(0, 2) === "BM") {
    if (v.getUint32(14, true) === 12) return { w: v.getUint16(18, true), h: v.getUint16(20, true) };
    return { w: Math.abs(v.getInt32(18, true)), h: Math.abs(v.getInt32(22, true)) };
  }
  if (has(30) && ascii(0, 4) === "RIFF" && ascii(8, 4) === "WEBP") {
    const kind = ascii(12, 4);
    if (kind === "VP8 ") return { w: v.getUint16(26, true) & 0x3fff, h: v.getUint16(28, true) & 0x3fff };
    if (kind === "VP8L") {
      return { w: 1 + (b[21] | ((b[22] & 0x3f) << 8)), h: 1 + ((b[22] >> 6) | (b[23] << 2) | ((b[24] & 0xf) << 10)) };
    }
    if (kind === "VP8X") {
      return { w: 1 + (b[24] | (b[25] << 8) | (b[26] << 16)), h: 1 + (b[27] | (b[28] << 8) | (b[29] << 16)) };
    }
    return null;
  }
  if (has(4) && b[0] === 0xff && b[1] === 0xd8) {  // JPEG: walk the segments to a frame header
    let i = 2;
    while (i + 9 < b.length) {
      if (b[i] !== 0xff) return null;
      const m = b[i + 1];
      if (m === 0xff) { i++; continue; }  // fill byte
      if (m === 0x01 || (m >= 0xd0 && m <= 0xd9)) { i += 2; continue; }  // no length
      const sof = m >= 0xc0 && m <= 0xcf && m !== 0xc4 && m !== 0xc8 && m !== 0xcc;
      if (sof) return { w: v.getUint16(i + 7), h: v.getUint16(i + 5) };
      i += 2 + v.getUint16(i + 2);
    }
  }
  return null;
}

async function imageSize(file) {
  try {
    return headerSize(await file.slice(0, Math.min(file.size, 4 * 1048576)).arrayBuffer());
  } catch (e) {
    return null;
  }
}

function preview(photo, img, file) {
  img.src = URL.createObjectURL(file);
  img.onerror = () => img.remove();
  photo.append(img);
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
      `JPEG, PNG, WebP, BMP, TIFF or GIF; up to ${mb(limits.max_upload_bytes)}` +
      (limits.max_pixels ? ` and ${megapixels(limits.max_pixels)} each.` : " each.");
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

// the classification heads of a face record, in the model's order (gender, ethnicity,
// and any other head the model has): every entry with probabilities but the age
function recordHeads(rec) {
  return Object.keys(rec).filter((k) => k !== "age" && rec[k] !== null &&
    typeof rec[k] === "object" && rec[k].probabilities);
}

const title = (head) => head.charAt(0).toUpperCase() + head.slice(1).replaceAll("_", " ");

function faceBlock(rec) {
  const div = el("div", "face");
  div.dataset.face = rec.face;
  const h = el("h3");
  h.append(el("span", "num", String(rec.face)), `Face ${rec.face}`);
  const how = rec.detection === "detected" ? `detector score ${rec.score}` : rec.detection;
  h.append(el("span", "status", ` (${how})`));
  div.append(h, ...recordHeads(rec).map((k) => headBlock(title(k), rec[k])));
  if (rec.age) div.append(ageBlock(rec.age));
  if (rec.explain) {
    const img = el("img", "cam");
    img.src = rec.explain;
    img.alt = `Grad-CAM of face ${rec.face}: the face, then where the ${recordHeads(rec).join(" and ")} heads looked`;
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
      b.append(el("span", null, `${rec.face}: ${recordHeads(rec).map((k) => rec[k].label).join(", ")}` +
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

// One card per photo, placed before `before` (null: at the end), so that the cards of a
// selection keep its order, above those of earlier selections.
async function analyse(file, before) {
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
  $("#results").insertBefore(card, before);
  if (limits && file.size > limits.max_upload_bytes) {
    return fail(card, `${file.name} is ${mb(file.size)}: over the upload limit of ${mb(limits.max_upload_bytes)} (not sent).`);
  }
  // the pixel count from the header, before any preview: the browser would decode a
  // decompression bomb whole; a photo of unknown size is shown once the server took it
  const image = file.type.startsWith("image/");
  const size = image ? await imageSize(file) : null;
  const pixels = size ? size.w * size.h : null;
  if (pixels !== null && limits && limits.max_pixels && pixels > limits.max_pixels) {
    return fail(card, `${file.name}: ${size.w}x${size.h} is ${megapixels(pixels)}, over the ` +
      `limit of ${megapixels(limits.max_pixels)} (not sent).`);
  }
  if (image && pixels !== null && pixels <= PREVIEW_PIXELS) preview(photo, img, file);
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
    if (image && pixels === null) preview(photo, img, file);  // the server read its size
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
  const first = $("#results").firstChild;  // this selection goes above the earlier ones
  list.forEach((file) => analyse(file, first));
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
