#!/usr/bin/env bash
# The GPU checks of issues 17, 18 and 24, as one script for a short device session (about 10 minutes).
# Every step writes its figures under $OUT as soon as it ends, so a session cut short keeps what it got.
# Run from the repository root on a machine with CUDA and torch installed:
#   OUT=/tmp/gpu bash docs/gpu_check.sh
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/progress.txt"; }
run() {  # run NAME SECONDS CMD...: stdout to $OUT/NAME.json (or .txt), stderr to $OUT/NAME.err
  local name=$1 limit=$2; shift 2
  log "start $name"
  timeout "$limit" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  log "end $name rc=$?"
}

nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
$PY -c "import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())" > "$OUT/env.txt" 2>&1
$PY -m pip install -q --no-deps -e . > /dev/null 2>&1 || true

# 0. issue 24: step times of the shipped sweeps' networks on this GPU, and the device-hours they imply
run steps_paper_table1 120 $PY -m nas.cli sweep steps paper_table1 --device cuda --out "$OUT/steps_paper_table1.json"
run estimate_paper_table1 60 $PY -m nas.cli sweep up paper_table1 --dry-run --step-times "$OUT/steps_paper_table1.json"
run steps_f_sweep 120 $PY -m nas.cli sweep steps f_sweep --device cuda --out "$OUT/steps_f_sweep.json"

# 1. the CUDA tests: stacked cell vs plain on CUDA, captured vs uncaptured training, bf16 + channels_last
run pytest_cuda 150 $PY -m pytest -q -x tests/test_graphs.py tests/test_bench_numerics.py tests/test_search_train.py \
  -k "cuda or captured"

# 2. fast vs plain images/s, bench config (C 16, 5 layers, batch 16): bf16, float32 (TF32), CUDA graphs
B="-m nas.cli bench search --device cuda --steps 20 --json"
run search2_bf16 60 $PY $B --order 2
run search2_graphs 60 $PY $B --order 2 --cuda-graphs
run search2_fp32 60 $PY $B --order 2 --no-amp
run search2_fp32_graphs 60 $PY $B --order 2 --no-amp --cuda-graphs
run search1_bf16 45 $PY $B --order 1
run search1_graphs 45 $PY $B --order 1 --cuda-graphs
run search1_fp32_graphs 45 $PY $B --order 1 --no-amp --cuda-graphs
# the search recipe: batch 64, 8 layers (projects a 50-epoch CIFAR-10 search: 25,000 / 64 steps an epoch)
run recipe2_graphs 90 $PY $B --order 2 --batch 64 --layers 8 --cuda-graphs
run recipe2_fp32_graphs 90 $PY $B --order 2 --batch 64 --layers 8 --cuda-graphs --no-amp

# 3. eval step (PIBCONV, C 36, 10 layers, batch 32), with and without graphs
E="-m nas.cli bench eval --device cuda --steps 30 --json"
run eval_bf16 45 $PY $E
run eval_graphs 45 $PY $E --cuda-graphs

# 4. kernels per step (torch profiler), fast side, second order, bench config
run kernels 90 $PY - <<'EOF'
import json, torch
from torch.profiler import ProfilerActivity, profile
from nas import bench
args = {"C": 16, "layers": 5, "batch": 16, "size": 32, "order": 2, "channels_last": True, "checkpoint_cells": False,
        "device": "cuda", "amp": True, "threads": 4, "steps": 1, "cuda_graphs": False}
images, labels = bench._synthetic(64, 32)
for fast in (True, False):
    step = bench.STEP_BUILDERS["search"](fast, args, images, labels)
    step(0); step(1); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        step(2); torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    print(json.dumps({"fast": fast, "kernels": len(events),
                      "kernel_ms": sum(e.device_time_total for e in events) / 1e3}), flush=True)
EOF

# 5. search trials sharing a GPU (sets the shipped search sweeps' gpu fraction)
run pack_search 120 $PY -m nas.cli bench pack --phase search --device cuda --trials 1,2,4 --seconds 15 --json

# 6. issue 18: a latency table on the GPU and its check against measured networks
run lut_build 90 $PY -m nas.cli lut build --op-set pibconv --channels 36 --layers 10 --device cuda --out "$OUT/lut_cuda.json"
run lut_check 90 $PY -m nas.cli lut check --lut "$OUT/lut_cuda.json" --genotypes 10 --json
log done
