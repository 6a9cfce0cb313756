"""Training and evaluation steps. ``predict`` runs a model over uint8 faces in batches."""

from __future__ import annotations

import numpy as np
import torch

from .augment import normalise


@torch.no_grad()
def predict(
    model: torch.nn.Module,
    images: np.ndarray | torch.Tensor,
    batch_size: int = 512,
    device: str | torch.device | None = None,
    embed: bool = False,
) -> dict[str, np.ndarray]:
    """Logits per head for uint8 faces ``(N, 48, 48)``, as float32 numpy ``(N, K)``.

    With ``embed=True`` the result also holds ``"embedding"`` ``(N, D)``.
    The model is put in eval mode; nothing is augmented.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()
    out: dict[str, list[np.ndarray]] = {}
    images = torch.as_tensor(images)
    for start in range(0, len(images), batch_size):
        x = normalise(images[start : start + batch_size].to(device))
        z = model.embed(x)
        logits = model.forward_head(z)
        if embed:
            logits = {**logits, "embedding": z}
        for k, v in logits.items():
            out.setdefault(k, []).append(v.float().cpu().numpy())
    return {k: np.concatenate(v) for k, v in out.items()}
