#!/usr/bin/env bash
# The GPU runs of docs/training.md, in one call on a lent GPU machine (the `device` tool):
#   - the reference exactly: `faceattrs run --preset paper` (every stage, age model too);
#   - the three-head EMA recipe of the shipped model at widths 1.0, 0.75 and 0.5.
# All start at once and share the GPU; every run stops at DEADLINE seconds after the start.
# Weights come back as fp16 safetensors, all runs' in one tar cut into 15 MiB pieces
# (`weights.tar.*`: the device tool returns at most 8 files of 16 MiB), everything else
# (configs, histories, logs, the paper run's metrics, figures and report) in small.tar.gz.
# RUNS (name:width:seed words, names w*_sN) and RECIPE choose the trainings, PAPER=0 skips
# the paper pipeline (already recorded in docs/results/paper-gpu), e.g.
#   PAPER=0 RUNS="w50_s2:0.5:2 w50_s3:0.5:3 w75_s2:0.75:2" DEADLINE=520 bash scripts/gpu_runs.sh CSV
# and a fourth field adds settings to one run, e.g. the age-bin loss beside plain seeds:
#   PAPER=0 RUNS="w50_s0:0.5:0 w50ab_s0:0.5:0:age_bin=1.0 w50ab_s1:0.5:1:age_bin=1.0" ...
# Every training records the prepared data's content key, so `faceattrs ensemble` joins
# these runs with runs trained at home on the same CSV.
#
#   run (device tool), carry [".whl", "gpu_data"], timeout_s 590:
#     DEADLINE=520 bash scripts/gpu_runs.sh gpu_data/utkface48.csv.gz
#
# Measured on one H200, 2026-11-29 (that command): the five trainings took 326-345 s; the
# paper pipeline reached its age stage at about 500 s and was stopped there (a second call
# on the warm machine ran `faceattrs run ... --resume --no-age` for the remaining stages).
# The age stage needs its own call, or the paper run alone.
#
# .whl holds kornia, kornia_rs and captum wheels for the machine's Python (3.12); gpu_data
# a copy of the CSV (both git-ignored through .git/info/exclude, never committed).
set -u
CSV=${1:?usage: gpu_runs.sh CSV}
DEADLINE=${DEADLINE:-450}
OUT=${OUT:-/tmp/gpu_out}
W=${W:-/tmp/w}
mkdir -p "$OUT" "$W"
start=$(date +%s)
# SMOKE=1: a tiny local rehearsal on the CPU (no wheels; one short epoch per run)
if [ -z "${SMOKE:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    EXTRA="" AGE_EXTRA=()
else
    EXTRA="epochs=1 limit=256 max_batches=2 device=cpu"
    AGE_EXTRA=(--age-set max_batches=2 --age-set finetune_epochs=1 --age-set head_epochs=1
               --age-set reg_epochs=2)
fi
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2 W
python3 -c "import torch, kornia, captum; print('torch', torch.__version__, 'kornia',
kornia.__version__, 'cuda', torch.cuda.is_available())" || exit 1

python3 -m faceattrs prepare --data "$CSV" --out $W/prep > $W/prepare.log 2>&1 || {
    cat $W/prepare.log; exit 1; }
# the split must be the one the runs are calibrated and evaluated on at home
python3 - <<'EOF'
import hashlib, os, numpy as np
d = np.load(os.environ["W"] + "/prep/faces.npz")
m = hashlib.sha256()
m.update(d["split"].tobytes()); m.update("\n".join(d["names"]).encode())
m.update(d["images"].tobytes())
print("prepared", len(d["split"]), "faces, hash", m.hexdigest()[:16], "(home: d6f6ca8bc6f25d9e)")
EOF

RECIPE=${RECIPE:-"--preset paper ema=0.998 age_head=true epochs=45 lr=1.5e-3 warmup_epochs=2 patience=50"}
# RUNS: name:width:seed[:key=value,...] words (names start with w and end in _sN; the
# optional fourth field adds settings to RECIPE for that run); PAPER=0 skips the paper run
RUNS=${RUNS:-"w100_s0:1.0:0 w75_s0:0.75:0 w75_s1:0.75:1 w50_s0:0.5:0 w50_s1:0.5:1"}
PAPER=${PAPER:-1}
pids=()
for spec in $RUNS; do
    IFS=: read -r name width seed extra <<< "$spec"
    # shellcheck disable=SC2086  # RECIPE, the run's own settings and EXTRA are word lists
    python3 -m faceattrs train --data $W/prep --out $W/$name --no-progress $RECIPE \
        width="$width" seed="$seed" ${extra//,/ } $EXTRA > $W/$name.log 2>&1 &
    pids+=($!)
done
if [ "$PAPER" = 1 ]; then
    mkdir -p $W/paper && cp -r $W/prep $W/paper/data  # the same prepared data (cache hit)
    python3 -m faceattrs run --data "$CSV" --out $W/paper --preset paper --no-progress \
        "${AGE_EXTRA[@]}" $EXTRA > $W/paper.log 2>&1 &
    pids+=($!)
fi

last=0
while :; do
    alive=0
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    now=$(( $(date +%s) - start ))
    if (( now - last >= 30 || alive == 0 )); then
        last=$now
        line="t=${now}s"
        for spec in $RUNS; do
            name=${spec%%:*}
            n=$(( $(wc -l < $W/$name/history.csv 2>/dev/null || echo 1) - 1 ))
            line+=" $name:$n"
        done
        [ "$PAPER" = 1 ] && line+=" paper:$(grep -o '== [a-z]*' $W/paper.log | tail -1 | cut -c4-)"
        echo "$line"
    fi
    (( alive == 0 )) && break
    if (( now >= DEADLINE )); then
        echo "deadline ${DEADLINE}s: stopping what still runs"
        kill "${pids[@]}" 2>/dev/null; sleep 5; break
    fi
    sleep 5
done

# weights as fp16 (loading casts them back), then small files
python3 - <<'EOF'
import json, pathlib, torch
from safetensors.torch import load_file, save_file
import os
for run in sorted(p for p in pathlib.Path(os.environ["W"]).glob("w*_s*") if p.is_dir()):
    st, meta = run / "best.safetensors", run / "best.json"
    if not (st.exists() and meta.exists()):
        print(run.name, "has no best checkpoint"); continue
    state = {k: v.half() if v.is_floating_point() else v for k, v in load_file(str(st)).items()}
    save_file(state, str(st))
    m = json.loads(meta.read_text()); m["weights_dtype"] = "float16"
    meta.write_text(json.dumps(m, indent=1))
    print(run.name, "epoch", m.get("epoch"), "val", {k: m[k] for k in m if "score" in k})
EOF
cd $W
tar czf "$OUT/small.tar.gz" --exclude='*.safetensors' --exclude='faces.npz' --exclude='*.pt' \
    ./*.log w*_s* paper prep/*.json 2>/dev/null
# every run's fp16 weights in one tar, cut into 15 MiB pieces (the tool returns files of at
# most 16 MiB); at home: cat weights.tar.* | tar xf - -C runs/gpu
tar cf - w*_s*/best.safetensors 2>/dev/null | split -b 15m - "$OUT/weights.tar."
ls -la "$OUT"
for n in $(ls *.log); do echo "--- $n"; tail -3 "$n"; done
cat paper/metrics.json 2>/dev/null | head -c 1500
echo "done in $(( $(date +%s) - start ))s"
