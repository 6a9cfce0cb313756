"""Trial: dlib's descriptor frozen, the three heads trained on it (issue 35 item 2, first
measurement). Descriptors: local/descriptors.npz (trials/utk_descriptors.py) (HOG-detected dlib chips of
every UTKFace chip). Writes a run folder any faceattrs command takes."""
import json, sys, time
from pathlib import Path
import numpy as np, torch
from faceattrs import train as T
from faceattrs import config as cfgmod
from faceattrs.checkpoint import save_checkpoint
from faceattrs.age.bins import quantile_edges
from faceattrs.engine import scores_from_confusion
from faceattrs.io import write_json_atomic

out = Path(sys.argv[1]); data = "local/prepared_dlib"
torch.manual_seed(0); torch.set_num_threads(1)
d = np.load('local/descriptors.npz (trials/utk_descriptors.py)')
idx = {str(n).split('/')[-1]: i for i, n in enumerate(d['names'])}
p = np.load('local/prepared_rgb96/faces.npz')  # same names, split, labels as prepared_dlib
rows = np.array([idx[str(n)] for n in p['names']])
X = torch.from_numpy(d['descriptor'][rows]).float()
split = p['split']
lab = {"gender": torch.from_numpy(p['gender'].astype(np.int64)),
       "ethnicity": torch.from_numpy(p['ethnicity'].astype(np.int64)),
       "age": torch.from_numpy(np.clip(p['age'].astype(np.int64), 0, 116))}
cfg = T.resolve_config("dlib", {"epochs": 40, "lr": 3e-3})
net = T.build_model(T.model_config(cfg)); init = T.load_init(net, "dlib")
edges = [float(e) for e in quantile_edges(lab["age"][split == 0].numpy(), 6)]
loss_fn = T.with_age_head(T.multitask_loss(cfg), cfg, edges)
opt = torch.optim.AdamW(net.heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
tr, va = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
best = (-1, None)
for epoch in range(1, cfg.epochs + 1):
    net.train(); perm = torch.from_numpy(np.random.default_rng(epoch).permutation(tr))
    for s in range(0, len(perm), 128):
        b = perm[s:s + 128]
        out_ = net.forward_head(X[b]); loss, _ = loss_fn(out_, {h: v[b] for h, v in lab.items()})
        opt.zero_grad(); loss.backward(); opt.step()
    net.eval()
    with torch.no_grad():
        o = net.forward_head(X[va])
    f1 = {}
    for h, k in (("gender", 2), ("ethnicity", 5)):
        cm = np.zeros((k, k), int); np.add.at(cm, (lab[h][va].numpy(), o[h].argmax(1).numpy()), 1)
        f1[h] = scores_from_confusion(cm)["macro_f1"]
        f1[h + "_acc"] = float(np.trace(cm) / cm.sum())
    ages = (o["age"].softmax(1) * torch.arange(117)).sum(1)
    mae = float((ages - lab["age"][va]).abs().mean())
    score = (f1["gender"] + f1["ethnicity"]) / 2
    print(epoch, {k: round(v, 4) for k, v in f1.items()}, "mae", round(mae, 2), "score", round(score, 4), flush=True)
    if score > best[0]:
        best = (score, {k: v.clone() for k, v in net.state_dict().items()}, epoch)
net.load_state_dict(best[1])
out.mkdir(parents=True, exist_ok=True)
meta = {"epoch": best[2], "score": best[0], "monitor": "val mean macro-F1 (gender, ethnicity)",
        "data": data, "config": cfgmod.to_dict(cfg), "age_edges": edges,
        "trial": "frozen dlib descriptor, heads trained on cached descriptors (local/frozen_heads.py)"}
save_checkpoint(out, "best", net, meta)
write_json_atomic(out / "config.json", {"data": data, "config": cfgmod.to_dict(cfg), "init": init})
print("best", best[2], best[0])
