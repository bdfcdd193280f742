#!/usr/bin/env bash
# The GPU check: a short, prepared run for a lent CUDA machine (one H100: under 8 minutes, every part under its own
# timeout: 435 s in all, and 5 s more per part for a kill after a timeout).
#   (a) demo   the embedded demo pipeline (`ldm demo`) with resources.compute.config.device set to the device
#   (b) train  the bf16 train step of the mid UNet and the mid MMDiT against diffusers (benchmarks.unet / .mmdit):
#              images/s, MFU against the GPU's datasheet dense bf16 peak, and the ratio
#   (c) fsdp   a 1-process FSDP2 run under torchrun (NCCL): a sharded MMDiT, a few steps, the loss must go down
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: benchmarks/results/gpu
#
# Dry run on a machine without a GPU (every command, on the CPU, with smaller sizes):
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_QUICK=1 GPU_CHECK_TIMEOUT_SCALE=4 bash benchmarks/gpu_check.sh /tmp/gpu-check
# GPU_CHECK_PARTS="train fsdp" runs a subset; GPU_CHECK_PEAK_TFLOPS overrides the datasheet peak;
# GPU_CHECK_TIMEOUT_SCALE=N multiplies every timeout (a CPU dry run needs ~4); PYTHON picks the interpreter
# (default: .venv/bin/python if present).
# Each part's log is OUT_DIR/<part>.log; OUT_DIR/summary.txt has one line per part; the exit status is 1 if any
# part failed or timed out.
set -uo pipefail

OUT=${1:-benchmarks/results/gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
QUICK=${GPU_CHECK_QUICK:-0}
PARTS=${GPU_CHECK_PARTS:-demo train fsdp}
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
FAILED=0

if [[ "$QUICK" == 1 ]]; then
    UNET_CONFIG=demo MMDIT_CONFIG=tiny ROUNDS=1 ITERS=1 SAMPLE_STEPS=2 FSDP_STEPS=3 FSDP_PRESET=tiny
else
    UNET_CONFIG=mid MMDIT_CONFIG=mid ROUNDS=3 ITERS=2 SAMPLE_STEPS=10 FSDP_STEPS=8 FSDP_PRESET=dit-b
fi

# part NAME SECONDS CMD...: run CMD under a timeout, its output to OUT/NAME.log and the screen, its status recorded
part() {
    local name=$1 limit=$(($2 * ${GPU_CHECK_TIMEOUT_SCALE:-1}))
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    local t0=$SECONDS rc
    timeout --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    rc=${PIPESTATUS[0]}
    local verdict=ok
    if [[ $rc == 124 || $rc == 137 ]]; then verdict="TIMED OUT"; elif [[ $rc != 0 ]]; then verdict="FAILED rc=$rc"; fi
    [[ $verdict == ok ]] || FAILED=1
    echo "$name: $verdict in $((SECONDS - t0)) s" | tee -a "$SUMMARY"
}

wants() { [[ " $PARTS " == *" $1 "* ]]; }

# ---- machine -----------------------------------------------------------------------------------------------------
GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
# datasheet dense bf16 peak, TFLOP/s (SXM parts; the PCIe H100 is clocked lower)
case "$GPU_NAME" in
    *H100*PCIe*) PEAK_TFLOPS=756 ;;
    *H100* | *H200*) PEAK_TFLOPS=989 ;;
    *A100*) PEAK_TFLOPS=312 ;;
    *) PEAK_TFLOPS= ;;
esac
PEAK_TFLOPS=${GPU_CHECK_PEAK_TFLOPS:-$PEAK_TFLOPS} # a dry run sets one to exercise the MFU column
{
    echo "device: $DEVICE; GPU: ${GPU_NAME:-none}; bf16 peak: ${PEAK_TFLOPS:-peak unknown} TFLOP/s; quick: $QUICK"
    "$PYTHON" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())'
} | tee "$OUT/machine.txt"

# ---- (a) the demo pipeline on the device -------------------------------------------------------------------------
if wants demo; then
    part demo-config 10 "$PYTHON" - "$DEVICE" "$OUT/demo-$DEVICE.yaml" <<'EOF'
import sys

import yaml

from pipeline import run_configs

config = run_configs.load("demo")
compute = config.setdefault("resources", {}).setdefault("compute", {}).setdefault("config", {})
compute["device"] = sys.argv[1]
with open(sys.argv[2], "w") as f:
    yaml.safe_dump(config, f, sort_keys=False)
EOF
    LDM_HOME="$OUT/ldm-home" part demo 230 "$PYTHON" -m pipeline.cli demo --config "$OUT/demo-$DEVICE.yaml"
fi

# ---- (b) bf16 train step against diffusers, with MFU against the datasheet peak -----------------------------------
if wants train; then
    part train-unet 70 "$PYTHON" -m benchmarks.unet --config "$UNET_CONFIG" --precision bf16 --device "$DEVICE" \
        --rounds "$ROUNDS" --iters "$ITERS" --sample-steps "$SAMPLE_STEPS" --json "$OUT/unet-$UNET_CONFIG-bf16.json"
    part train-mmdit 70 "$PYTHON" -m benchmarks.mmdit --config "$MMDIT_CONFIG" --precision bf16 --device "$DEVICE" \
        --rounds "$ROUNDS" --iters "$ITERS" --sample-steps "$SAMPLE_STEPS" --json "$OUT/mmdit-$MMDIT_CONFIG-bf16.json"
    # the table (OUT/train-mfu.log): each side's rate and MFU = its own FLOPs per image (meta device) x its rate / peak
    part train-mfu 10 "$PYTHON" - "${PEAK_TFLOPS:-}" "$OUT/unet-$UNET_CONFIG-bf16.json" \
        "$OUT/mmdit-$MMDIT_CONFIG-bf16.json" <<'EOF'
import json
import sys
from pathlib import Path

peak = float(sys.argv[1]) * 1e12 if sys.argv[1] else None
print("| bf16 train step | ours img/s | diffusers img/s | ours / diffusers | MFU ours | MFU diffusers |")
print("|---|---|---|---|---|---|")
for path in sys.argv[2:]:
    if not Path(path).exists():
        sys.exit(f"{path}: no result (its part failed)")
    for r in json.loads(Path(path).read_text())["results"]:
        ours, theirs = r["train_ours_images_per_s"], r["train_diffusers_images_per_s"]

        def mfu(flops: float, rate: float) -> str:
            return f"{100 * flops * rate / peak:.1f}%" if peak else "peak unknown"

        print(
            f"| {r['benchmark']} {r['config']} (b{r['batch']}) | {ours:.1f} | {theirs:.1f} | {r['train_ratio']:.2f}x | "
            f"{mfu(r['train_flops_ours'], ours)} | {mfu(r['train_flops_diffusers'], theirs)} |"
        )
EOF
fi

# ---- (c) FSDP2 on one GPU under torchrun --------------------------------------------------------------------------
if wants fsdp; then
    part fsdp-smoke 45 "$PYTHON" -m torch.distributed.run --standalone --nproc-per-node 1 -m benchmarks.fsdp smoke \
        --device "$DEVICE" --precision bf16 --steps "$FSDP_STEPS" --preset "$FSDP_PRESET" --json "$OUT/fsdp-smoke.json"
fi

echo "=== summary ($OUT/summary.txt)"
cat "$SUMMARY"
exit $FAILED
