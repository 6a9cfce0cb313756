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

from .bundle import resolve
from .calibrate import apply_temperatures
from .dataset import FaceSet
from .engine import predict
from .evaluate import head_letter, write_npz
from .exceptions import FaceattrsError
from .inputs import normalise
from .io import write_json_atomic
from .labels import ETHNICITIES, IMAGE_SIZE

log = logging.getLogger(__name__)

DISPLAY_SIZE = 192  # pixels of a displayed overlay (4x the model's input)


def layer_cam(
    model: torch.nn.Module, x: torch.Tensor, head: str, target: torch.Tensor
) -> torch.Tensor:
    """Raw Grad-CAM ``(B, h, w)`` (ReLU'd, unscaled) of ``head``'s logit ``target`` at the CAM layer."""
    try:
        from captum.attr import LayerGradCam  # optional dependency: faceattrs[explain]
    except ImportError:
        raise FaceattrsError("Grad-CAM needs captum: pip install 'faceattrs[explain]'") from None
    layer = model.get_submodule(model.cam_layer)
    cam = LayerGradCam(lambda inp: model(inp)[head], layer)
    with torch.enable_grad():
        attr = cam.attribute(x, target=target, relu_attributions=True)
    return attr.detach()[:, 0]


def grad_cam(
    model: torch.nn.Module,
    images: np.ndarray,
    head: str,
    target: np.ndarray | None = None,
    batch_size: int = 64,
) -> np.ndarray:
    """Grad-CAM maps ``(N, 48, 48)`` float32 in [0, 1] for uint8 faces ``(N, 48, 48)``.

    ``target``: the class per face to explain; default the predicted class of ``head``.
    """
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        x = normalise(torch.as_tensor(images[start : start + batch_size]).to(device))
        if target is None:
            with torch.no_grad():
                t = model(x)[head].argmax(1)
        else:
            t = torch.as_tensor(target[start : start + batch_size], device=device).long()
        raw = layer_cam(model, x, head, t).unsqueeze(1)
        up = F.interpolate(
            raw, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )[:, 0]
        peak = up.flatten(1).amax(1).clamp_min(1e-12)[:, None, None]
        out.append((up / peak).clamp_(0, 1).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, IMAGE_SIZE, IMAGE_SIZE), np.float32)


def smooth(cam: np.ndarray, size: int = DISPLAY_SIZE) -> np.ndarray:
    """A 48x48 map upsampled bicubically to ``size`` x ``size`` for display, kept in [0, 1]."""
    return np.clip(
        cv2.resize(cam.astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC), 0, 1
    )


def explain_faces(model, images: np.ndarray, temps: dict[str, float]) -> dict:
    """Probabilities (temperature-scaled when calibrated) and Grad-CAM maps of every head
    of ``model`` (gender and ethnicity for the multitask model)."""
    logits = predict(model, images)
    probs = apply_temperatures({h: logits[h] for h in model.cfg.heads}, temps)
    cams = {h: grad_cam(model, images, h, target=probs[h].argmax(1)) for h in probs}
    return {"probs": probs, "cams": cams}


def _rows(images, ex, names, labels, truth=None) -> list[dict]:
    """Rows for :func:`faceattrs.plots.evaluate.cam_grid`; ``truth[head][i]`` marks mistakes."""
    rows = []
    for i, face in enumerate(images):
        row = {"face": face, "label": labels[i], "cams": {}, "titles": {}, "wrong": {}}
        for h in ex["probs"]:
            k = int(ex["probs"][h][i].argmax())
            row["cams"][h] = smooth(ex["cams"][h][i])
            row["titles"][h] = (
                f"{h} CAM\nPred {head_letter(h)}: {names[h][k]} ({ex['probs'][h][i, k]:.2f})"
            )
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
    model_dir: str | Path, photo: str | Path, out_dir: str | Path, device: str = "cpu"
) -> dict:
    """Find the faces in an ordinary photo, crop them as the model expects and explain them.

    Writes ``STEM_faces.png`` (the photo with numbered boxes), ``STEM_gradcam.png`` (per
    face: crop, gender and ethnicity overlays with predicted labels and probabilities),
    ``STEM_gradcam.npz`` (the 48x48 maps) and ``STEM.json``.
    """
    from .photo import extract_faces, load_image
    from .plots import evaluate as plots

    photo, out_dir = Path(photo), Path(out_dir)
    image = load_image(photo)
    found = extract_faces(image)
    if not found:
        raise FaceattrsError(f"no face found in {photo}")
    crops = np.stack([np.asarray(f.crop, dtype=np.uint8) for f in found])
    bundle = resolve(model_dir)
    model, meta = bundle.load_multitask(device)
    ex = explain_faces(model, crops, bundle.temperatures)
    names = meta["class_names"]
    boxes = [[int(v) for v in f.box] for f in found]
    stem = photo.stem
    plots.photo_boxes(image, boxes, out_dir / f"{stem}_faces.png")
    rows = _rows(crops, ex, names, [f"face {i}" for i in range(len(found))])
    plots.cam_grid(rows, out_dir / f"{stem}_gradcam.png", title=f"Grad-CAM: {photo.name}")
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
    from .plots import evaluate as plots

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
        log.warning("no misclassified %s faces of %s in %s", split, classes, model_dir)
        write_json_atomic(out_dir / f"{tag}.json", result)
        return result
    shown = sub.take(pick)
    ex = explain_faces(model, shown.images, temps)
    truth = {h: getattr(shown, h) for h in ex["probs"] if hasattr(shown, h)}
    labels = [
        f"row {int(faces.indices(split)[i])}\nTrue G: {names['gender'][g]}, E: {names['ethnicity'][e]}"
        for i, g, e in zip(pick, shown.gender, shown.ethnicity, strict=True)
    ]
    plots.cam_grid(
        _rows(shown.images, ex, names, labels, truth),
        out_dir / f"{tag}.png",
        title=f"Grad-CAM on misclassified {split} faces: {', '.join(classes)}",
    )
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
