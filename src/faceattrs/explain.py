"""Grad-CAM explanations for the gender and ethnicity heads (captum's LayerGradCam).

Maps are taken at ``model.cam_layer`` (the last residual stage, 6x6 at 48x48 input),
ReLU'd, upsampled bilinearly to 48x48 and scaled to [0, 1] per face (a face whose map is
all zero stays zero). :func:`smooth` upsamples further, bicubically, for display. Each
head is explained for its own predicted class: where the network looked to decide.

Commands: ``faceattrs explain --model runs/paper --image photo.jpg`` (faces found in an
ordinary photo) and ``faceattrs explain --model runs/paper --misclassified Indian,Other``
(misclassified test faces of those classes); results go to ``runs/paper/explain``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from .age.direct import HEAD as AGE_HEAD
from .bundle import resolve
from .calibrate import apply_temperatures
from .dataset import FaceSet
from .evaluate import head_letter, write_npz
from .exceptions import FaceattrsError
from .io import write_json_atomic, write_with
from .labels import ETHNICITIES
from .model import predict
from .photo import extract_faces, load_image

log = logging.getLogger(__name__)

DISPLAY_SIZE = 192  # pixels of a displayed overlay (4x the model's input)


def layer_cam(
    model: torch.nn.Module, x: torch.Tensor, head: str, target: torch.Tensor
) -> torch.Tensor:
    """Raw Grad-CAM ``(B, h, w)`` (ReLU'd, unscaled) of ``head``'s logit ``target`` at the CAM layer.

    The map explains the face as given: a model's flip TTA is off while the map is taken
    (its second, mirrored pass would otherwise be the one the layer hook records). For an
    ensemble (``model.cam_layers``) it is the sum of the maps at each member's layer, all
    of the ensemble's logit.
    """
    try:
        from captum.attr import LayerGradCam  # optional dependency: faceattrs[explain]
    except ImportError:
        raise FaceattrsError("Grad-CAM needs captum: pip install 'faceattrs[explain]'") from None
    names = getattr(model, "cam_layers", [model.cam_layer])  # an ensemble: every member's
    flip = getattr(model, "flip_tta", False)
    model.flip_tta = False
    try:
        attr = 0
        for name in names:
            cam = LayerGradCam(lambda inp: model(inp)[head], model.get_submodule(name))
            with torch.enable_grad():
                attr = attr + cam.attribute(x, target=target, relu_attributions=True)
    finally:
        model.flip_tta = flip
    return attr.detach()[:, 0]


def grad_cam(
    model: torch.nn.Module,
    images: np.ndarray,
    head: str,
    target: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM maps ``(N, S, S)`` float32 in [0, 1] for uint8 faces of ``model.input``
    (``(N, S, S)`` gray or ``(N, S, S, 3)`` RGB).

    ``target``: the class per face to explain; default the predicted class of ``head``.
    """
    model.eval()
    device = next(model.parameters()).device
    size = model.input.size
    out = []
    for start in range(0, len(images), batch_size):
        x = model.input.normalise(torch.as_tensor(images[start : start + batch_size]).to(device))
        if target is None:
            with torch.no_grad():
                t = model(x)[head].argmax(1)
        else:
            t = torch.as_tensor(target[start : start + batch_size], device=device).long()
        raw = layer_cam(model, x, head, t).unsqueeze(1)
        up = F.interpolate(raw, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
        peak = up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        out.append((up / peak).clamp_(0, 1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, size, size), np.float32)


def smooth(cam: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """A face-sized map upsampled bicubically to ``size`` x ``size`` for display, kept in [0, 1]."""
    return np.clip(
        cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC), 0, 1
    )


def explain_faces(model, images: np.ndarray, temps: dict[str, float]) -> dict:
    """Probabilities (temperature-scaled when calibrated) and Grad-CAM maps of every head
    of ``model`` (gender and ethnicity for the multitask model; not a network's own age
    head, whose per-year logits are the age model's)."""
    logits = predict(model, images)
    heads = [h for h in model.cfg.heads if h != AGE_HEAD]
    probs = apply_temperatures({h: logits[h] for h in heads}, temps)
    cams = {h: grad_cam(model, images, h, target=probs[h].argmax(1)) for h in probs}
    return {"probs": probs, "cams": cams}


RIGHT, WRONG = (255, 255, 255), (255, 80, 80)  # caption colours (RGB)
LINE = 16  # pixels per caption line (one line: a 22-pixel bar)


def _caption(img: np.ndarray, lines: list[tuple[str, tuple]], n_lines: int) -> np.ndarray:
    """``img`` (RGB) under a black bar with ``lines`` of ``(text, colour)``."""
    bar = np.zeros((6 + LINE * n_lines, img.shape[1], 3), np.uint8)
    for i, (text, colour) in enumerate(lines):
        y = 16 + LINE * i
        cv2.putText(bar, text, (4, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, colour, 1, cv2.LINE_AA)
    return np.vstack([bar, img])


def cam_panels(row: dict, size: int = DISPLAY_SIZE, n_lines: int = 1) -> np.ndarray:
    """One face's explanation as an RGB picture: the face, then per head its Grad-CAM over
    the face (JET colours, 45 %), each under its caption; a wrong head's caption is red.

    ``row``: ``{"face": (48, 48) uint8, "label": str, "cams": {head: (48, 48) in [0, 1]},
    "titles": {head: str}, "wrong": {head: bool}}`` (:func:`explanation_rows`). Captions may
    hold several lines (``\\n``); ``n_lines`` is the bar height in lines. The one drawing
    of explanations: ``faceattrs explain`` and ``faceattrs predict --explain`` both use it.
    """
    big = cv2.resize(row["face"], (size, size), interpolation=cv2.INTER_CUBIC)
    face = cv2.cvtColor(big, cv2.COLOR_GRAY2RGB) if big.ndim == 2 else big  # RGB: in colour
    label = [(t, RIGHT) for t in str(row.get("label", "")).split("\n")]
    panels = [_caption(face, label, n_lines)]
    for h, cam in row["cams"].items():
        heat = cv2.applyColorMap((smooth(cam, size) * 255).astype(np.uint8), cv2.COLORMAP_JET)
        blend = cv2.addWeighted(face, 0.55, heat[..., ::-1], 0.45, 0)
        colour = WRONG if row.get("wrong", {}).get(h) else RIGHT
        lines = [(t, colour) for t in row["titles"][h].split("\n")]
        panels.append(_caption(blend, lines, n_lines))
    return np.hstack(panels)


def cam_sheet(rows: list[dict], title: str | None = None, per_row: int = 2) -> np.ndarray:
    """:func:`cam_panels` of several faces, ``per_row`` side by side, under a title bar."""
    n_lines = max(
        len(t.split("\n")) for r in rows for t in [str(r.get("label", "")), *r["titles"].values()]
    )
    pics = [cam_panels(r, n_lines=n_lines) for r in rows]
    per_row = max(1, min(per_row, len(pics)))
    blank = np.zeros_like(pics[0])
    pics += [blank] * (-len(pics) % per_row)
    sheet = np.vstack([np.hstack(pics[i : i + per_row]) for i in range(0, len(pics), per_row)])
    return _caption(sheet, [(title, RIGHT)], 1) if title else sheet


def save_picture(path: Path, rgb: np.ndarray) -> Path:
    """Write an RGB picture as PNG (atomically)."""
    ok, png = cv2.imencode(".png", np.ascontiguousarray(rgb[..., ::-1]))
    if not ok:
        raise FaceattrsError(f"could not encode {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda tmp: Path(tmp).write_bytes(png.tobytes()))
    return path


def explanation_rows(images, ex, names, labels, truth=None) -> list[dict]:
    """Rows for :func:`cam_panels`: captions ``HEAD: LABEL P`` (``truth[head][i]`` marks
    mistakes in red)."""
    rows = []
    for i, face in enumerate(images):
        row = {"face": face, "label": labels[i], "cams": {}, "titles": {}, "wrong": {}}
        for h in ex["probs"]:
            k = int(ex["probs"][h][i].argmax())
            row["cams"][h] = ex["cams"][h][i]
            row["titles"][h] = f"{h}: {names[h][k]} {ex['probs'][h][i, k]:.2f}"
            row["wrong"][h] = truth is not None and h in truth and k != int(truth[h][i])
        rows.append(row)
    return rows


def _face_record(ex, names, i: int) -> dict:
    return {
        h: {
            "label": names[h][int(ex["probs"][h][i].argmax())],
            "probability": round(float(ex["probs"][h][i].max()), 4),
            "probabilities": dict(zip(names[h], ex["probs"][h][i].round(4).tolist(), strict=True)),
        }
        for h in ex["probs"]
    }


def _detector(face) -> dict:
    """The photo stage's extra facts about a face (detector score, how it was found), if any."""
    return {k: getattr(face, k) for k in ("score", "kind") if getattr(face, k, None) is not None}


def explain_photo(
    model_dir: str | Path,
    photo: str | Path,
    out_dir: str | Path,
    device: str = "cpu",
    max_pixels: int | None = None,
) -> dict:
    """Find the faces in an ordinary photo, crop them as the model expects and explain them.

    Writes ``STEM_faces.png`` (the photo with numbered boxes), ``STEM_gradcam.png`` (per
    face: crop, gender and ethnicity overlays with predicted labels and probabilities),
    ``STEM_gradcam.npz`` (the face-sized maps) and ``STEM.json``.
    """
    # matplotlib: loaded only when figures are drawn
    from .plots import evaluate as plots

    photo, out_dir = Path(photo), Path(out_dir)
    bundle = resolve(model_dir)
    image = load_image(photo, max_pixels)  # None: the default limit
    found = extract_faces(image, spec=bundle.input)  # cropped as this model was trained
    if not found:
        raise FaceattrsError(f"no face found in {photo}")
    crops = np.stack([np.asarray(f.crop, dtype=np.uint8) for f in found])
    model, meta = bundle.load_multitask(device)
    ex = explain_faces(model, crops, bundle.temperatures)
    names = meta["class_names"]
    boxes = [[int(v) for v in f.box] for f in found]
    stem = photo.stem
    plots.photo_boxes(image, boxes, out_dir / f"{stem}_faces.png")
    rows = explanation_rows(crops, ex, names, [f"face {i}" for i in range(len(found))])
    sheet = cam_sheet(rows, title=f"Grad-CAM: {photo.name}")
    save_picture(out_dir / f"{stem}_gradcam.png", sheet)
    write_npz(
        out_dir / f"{stem}_gradcam.npz",
        **{f"{h}_cam": ex["cams"][h] for h in ex["cams"]},
        crops=crops,
    )
    result = {
        "photo": str(photo),
        "faces": [
            {"box": boxes[i], "detector": _detector(f), **_face_record(ex, names, i)}
            for i, f in enumerate(found)
        ],
        "figures": [f"{stem}_faces.png", f"{stem}_gradcam.png"],
    }
    write_json_atomic(out_dir / f"{stem}.json", result)
    log.info("%d face(s) in %s -> %s", len(found), photo, out_dir / f"{stem}_gradcam.png")
    return result


def parse_classes(text: str | list[str]) -> list[str]:
    """``"indian,Other"`` -> ``["Indian", "Other"]`` (ethnicity names, any case)."""
    items = text.split(",") if isinstance(text, str) else list(text)
    lookup = {e.lower(): e for e in ETHNICITIES}
    out = []
    for item in (i.strip() for i in items if i.strip()):
        if item.lower() not in lookup:
            raise FaceattrsError(
                f"unknown ethnicity {item!r}; use some of {', '.join(ETHNICITIES)}"
            )
        out.append(lookup[item.lower()])
    if not out:
        raise FaceattrsError(f"no ethnicity given; use some of {', '.join(ETHNICITIES)}")
    return out


def pick_misclassified(
    true: np.ndarray, pred: np.ndarray, conf: np.ndarray, classes: list[int], limit: int
) -> np.ndarray:
    """Up to ``limit`` misclassified rows of ``classes``: taken in turn from each class, most
    confident mistake first, so every class is shown and no slot is left empty.

    >>> pick_misclassified(np.array([3, 3, 3, 4, 0]), np.array([0, 0, 3, 1, 1]),
    ...                    np.array([0.5, 0.9, 0.9, 0.6, 0.9]), [3, 4], limit=2).tolist()
    [1, 3]
    """
    queues = []
    for k in classes:
        rows = np.flatnonzero((true == k) & (pred != true))
        queues.append(list(rows[np.argsort(-conf[rows], kind="stable")]))
    picked = []
    while len(picked) < limit and any(queues):
        for q in queues:
            if q and len(picked) < limit:
                picked.append(q.pop(0))
    return np.sort(np.asarray(picked, dtype=int))


def explain_misclassified(
    model_dir: str | Path,
    faces: FaceSet,
    classes: str | list[str],
    out_dir: str | Path,
    split: str = "test",
    max_faces: int = 16,
    device: str = "cpu",
) -> dict:
    """Grad-CAM grid of misclassified ``split`` faces whose true ethnicity is in ``classes``.

    Writes ``misclassified_CLASSES.png`` / ``.json`` / ``_gradcam.npz`` to ``out_dir``.
    """
    classes = parse_classes(classes)
    out_dir, sub = Path(out_dir), faces.subset(split)
    bundle = resolve(model_dir)
    model, meta = bundle.load_multitask(device)
    temps, names = bundle.temperatures, meta["class_names"]
    logits = predict(model, sub.images)
    probs = apply_temperatures({"ethnicity": logits["ethnicity"]}, temps)["ethnicity"]
    ids = [ETHNICITIES.index(c) for c in classes]
    pick = pick_misclassified(sub.ethnicity, probs.argmax(1), probs.max(1), ids, max_faces)
    tag = "misclassified_" + "-".join(classes)
    result = {"split": split, "classes": classes, "n_shown": len(pick), "faces": []}
    result["n_misclassified"] = int(
        (np.isin(sub.ethnicity, ids) & (probs.argmax(1) != sub.ethnicity)).sum()
    )
    if len(pick) == 0:
        log.warning("no misclassified faces of %s in split %r (%s)", classes, split, bundle.path)
        write_json_atomic(out_dir / f"{tag}.json", result)
        return result
    shown = sub.take(pick)
    ex = explain_faces(model, shown.images, temps)
    truth = {h: shown.labels[h] for h in ex["probs"] if h in shown.labels}
    labels = [
        f"row {int(faces.indices(split)[i])}\n"
        + ", ".join(f"{head_letter(h)}: {names[h][int(truth[h][j])]}" for h in truth)
        for j, i in enumerate(pick)
    ]
    rows = explanation_rows(shown.images, ex, names, labels, truth)
    title = f"Grad-CAM on misclassified {split} faces: {', '.join(classes)}"
    save_picture(out_dir / f"{tag}.png", cam_sheet(rows, title=title))
    write_npz(
        out_dir / f"{tag}_gradcam.npz",
        index=faces.indices(split)[pick],
        **{f"{h}_cam": ex["cams"][h] for h in ex["cams"]},
    )
    for j, i in enumerate(pick):
        rec = {"index": int(faces.indices(split)[i]), "name": str(shown.names[j])}
        rec["true"] = {h: names[h][int(truth[h][j])] for h in truth}
        result["faces"].append({**rec, **_face_record(ex, names, j)})
    result["figures"] = [f"{tag}.png"]
    write_json_atomic(out_dir / f"{tag}.json", result)
    log.info(
        "%d of %d misclassified faces shown -> %s",
        len(pick),
        result["n_misclassified"],
        out_dir / f"{tag}.png",
    )
    return result
