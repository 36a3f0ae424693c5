#!/usr/bin/env bash
# The GPU path in a few minutes on one GPU (two for the torchrun part), from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default: runs/gpu-check; $OUT if set)
#     DEVICE=cpu STEPS=20 QUICK=1 bash benchmarks/gpu_check.sh /tmp/dry   # a dry run of the script on a CPU
#
# 1. correctness: 200 steps on the digits, same seed, on the CPU and on cuda:0 (float32, TF32
#    off): the two loss curves side by side and their largest relative gap; the GPU run's
#    checkpoint sampled on the CPU (checkpoints load anywhere);
# 2. the fast path: the same run with bf16 autocast, channels_last and torch.compile, its loss
#    against the float32 one;
# 3. throughput: benchmarks/throughput.py on the CIFAR-10 U-Net (google/ddpm-cifar10-32 layout) in
#    bf16 at batch 128, img/s, ms per evaluation, MFU and peak memory, beside diffusers' UNet2DModel;
# 4. with two or more GPUs: torchrun --nproc_per_node 2 (NCCL) of run 1, its loss curve against
#    the one-GPU run (the same to float rounding: the global batch and its noise are the same).
set -euo pipefail
OUT="$(realpath -m "${1:-${OUT:-runs/gpu-check}}")"
cd "$(dirname "$0")/.."  # the repository root
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-200}"
mkdir -p "$OUT"
python -c "import diffspace" 2>/dev/null || python -m pip install -q -e . --no-deps
python -c "import diffusers" 2>/dev/null || python -m pip install -q "diffusers>=0.30" || true
if [ "$DEVICE" = cuda ]; then nvidia-smi -L | tee "$OUT/gpus.txt"; GPUS=$(nvidia-smi -L | wc -l); else GPUS=0; fi
RUN=(--data digits --quiet model.base_channels=32 model.channel_mult=[1,2] model.num_blocks=1
     train.batch_size=128 log.every=10 log.sample_every=0 "log.checkpoint_every=$STEPS" --steps "$STEPS")

echo "== 1. CPU vs GPU, float32"
python -m diffspace train "${RUN[@]}" train.device=cpu --out "$OUT/cpu"
NVIDIA_TF32_OVERRIDE=0 python -m diffspace train "${RUN[@]}" "train.device=$DEVICE" --out "$OUT/gpu"
python - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
def loss(run):
    with open(out / run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
a, b = loss("cpu"), loss("gpu")
gap = max(abs(x - y) / abs(x) for x, y in zip(a, b))
print("step-wise loss, cpu vs gpu (every 10 steps):")
for i, (x, y) in enumerate(zip(a, b)):
    print(f"  {10 * (i + 1):4d}  {x:.5f}  {y:.5f}")
print(f"largest relative gap: {gap:.2e}")
EOF
CUDA_VISIBLE_DEVICES="" python -m diffspace sample "$OUT/gpu" -n 16 --out "$OUT/gpu-on-cpu.png"

echo "== 2. bf16 + channels_last + compile"
COMPILE=$([ "${QUICK:-0}" = 1 ] && echo false || echo true)
python -m diffspace train "${RUN[@]}" "train.device=$DEVICE" train.bf16=true train.channels_last=true "train.compile=$COMPILE" --out "$OUT/fast"
python - "$OUT" <<'EOF'
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {r: list(csv.DictReader(open(out / r / "metrics.csv"))) for r in ("gpu", "fast")}
print("final loss fp32 %s, bf16+compile %s; samples/s fp32 %s, bf16+compile %s" % (
    rows["gpu"][-1]["loss"], rows["fast"][-1]["loss"], rows["gpu"][-1]["samples_per_s"], rows["fast"][-1]["samples_per_s"]))
EOF

echo "== 3. throughput, CIFAR-10 U-Net, bf16"
if [ "${QUICK:-0}" = 1 ]; then
  python benchmarks/throughput.py --device "$DEVICE" --quick | tee "$OUT/throughput.md"
else
  python benchmarks/throughput.py --device "$DEVICE" --layouts cifar10 --batch 128 --reps 10 --compile | tee "$OUT/throughput.md"
fi

if [ "$GPUS" -ge 2 ]; then
  echo "== 4. torchrun, 2 GPUs (NCCL)"
  NVIDIA_TF32_OVERRIDE=0 torchrun --standalone --nproc_per_node 2 -m diffspace train "${RUN[@]}" train.device=cuda --out "$OUT/gpu2"
  paste -d, <(cut -d, -f1,2 "$OUT/gpu/metrics.csv") <(cut -d, -f2 "$OUT/gpu2/metrics.csv") | tail -5
else
  echo "== 4. skipped: fewer than two GPUs"
fi
echo "done: $OUT"
