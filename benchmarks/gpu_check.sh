#!/usr/bin/env bash
# The GPU path in a few minutes on one GPU (two for the torchrun part), from the repository root:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]        (default: runs/gpu-check; $OUT if set)
#     DEVICE=cpu STEPS=20 QUICK=1 bash benchmarks/gpu_check.sh /tmp/dry   # a dry run of the script on a CPU
#     PARTS="3 4 4b" bash benchmarks/gpu_check.sh     # some parts only (default: all, 1 2 3 4 4b 5); the
#                                                    # whole script can outlast a 10-minute call: split it
#
# 1. correctness: (a) one training step's loss and gradients on the same batch, noise and weights,
#    in float32 on the CPU and on cuda:0 (TF32 off) against a float64 CPU reference; (b) 200 steps
#    on the digits, same seed, on the CPU and on cuda:0: the two loss curves side by side (their
#    noise streams differ: torch's CPU and CUDA generators are different algorithms, so the curves
#    agree in distribution, not to rounding); the GPU run's checkpoint sampled on the CPU; (c) that
#    checkpoint sampled and evaluated (samples, likelihood) on the GPU (--device), and evaluated on the CPU;
# 2. the fast path: the same run with bf16 autocast, channels_last and torch.compile, its loss
#    against the float32 one;
# 3. throughput: benchmarks/throughput.py on the CIFAR-10 U-Net (google/ddpm-cifar10-32 layout) in
#    bf16 at batch 128 (and eager at 512), img/s, ms per evaluation, MFU and peak memory, beside
#    diffusers' UNet2DModel;
# 4. the CIFAR-10 DDPM recipe (configs/cifar10-ddpm.toml) through the trainer on a synthetic file in
#    CIFAR-10's binary format: img/s of the whole training step, eager and compiled;
#    4b. the host-device synchronisations per training step, counted by torch.cuda.set_sync_debug_mode;
# 5. with two or more GPUs: torchrun --nproc_per_node 2 (NCCL) of run 1b, its loss curve against
#    the one-GPU run (the same to float rounding: the global batch and its noise are the same), and
#    eval sharded over the two GPUs (NCCL, its host-side agreements on gloo).
# Each part has its own time limit and the script goes on after a failure (it says which).
set -uo pipefail
OUT="$(realpath -m "${1:-${OUT:-runs/gpu-check}}")"
cd "$(dirname "$0")/.."  # the repository root
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the checkout's diffspace, installed or not
DEVICE="${DEVICE:-cuda}"
STEPS="${STEPS:-200}"
QUICK="${QUICK:-0}"
PARTS=" ${PARTS:-1 2 3 4 4b 5} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
mkdir -p "$OUT"
python -c "import diffusers" 2>/dev/null || echo "diffusers is not importable: part 3 will fail (pip install -e .[bench])"
if [ "$DEVICE" = cuda ]; then nvidia-smi -L | tee "$OUT/gpus.txt"; GPUS=$(nvidia-smi -L | wc -l); else GPUS=0; fi
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
RUN=(--data digits --quiet model.base_channels=32 model.channel_mult=[1,2] model.num_blocks=1
     train.batch_size=128 log.every=10 log.sample_every=0 "log.checkpoint_every=$STEPS" --steps "$STEPS")
part() { echo; echo "== $1"; }
failed() { echo "!! part $1 failed or ran out of time (rc $2)"; }

if want 1; then
part "1a. one training step, float32 on cpu and $DEVICE against float64"
timeout 200 python -m diffspace train "${RUN[@]}" train.device=cpu --out "$OUT/cpu" || failed 1b-cpu $?
timeout 90 python - "$OUT/cpu" "$DEVICE" <<'EOF' || failed 1a $?
import sys
import torch
from diffspace.data import load
from diffspace.model import load_model
torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
run, device = sys.argv[1], sys.argv[2]
x = load("digits").x[:256]
from pathlib import Path
run = Path(run)
reference = load_model(run, "cpu")[0].double()
t, eps, _ = reference.draw(x.double(), torch.Generator().manual_seed(0))  # one batch's noise, drawn once
def step(model, dtype, where):
    loss = model.loss(x.to(where, dtype), None, t=t.to(where), eps=eps.to(where, dtype)).mean()
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.double().cpu(), torch.cat([g.reshape(-1) for g in grads]).double().cpu()
loss64, grad64 = step(reference, torch.float64, "cpu")
for where in ("cpu", device):
    loss, grad = step(load_model(run, where)[0], torch.float32, where)
    print(f"float32 on {where:5s}: loss rel. error {abs(loss - loss64) / loss64:.1e}, "
          f"gradient rel. error |g - g64| / |g64| {(grad - grad64).norm() / grad64.norm():.1e}")
EOF

part "1b. 200 steps on cpu and $DEVICE (float32, TF32 off)"
NVIDIA_TF32_OVERRIDE=0 timeout 150 python -m diffspace train "${RUN[@]}" "train.device=$DEVICE" --out "$OUT/gpu" || failed 1b $?
python - "$OUT" <<'EOF' || failed 1b-compare $?
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
def loss(run):
    with open(out / run / "metrics.csv") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]
a, b = loss("cpu"), loss("gpu")
print("mean loss over each 10 steps, cpu vs gpu:")
for i, (x, y) in enumerate(zip(a, b)):
    print(f"  {10 * (i + 1):4d}  {x:.5f}  {y:.5f}")
half = len(a) // 2
print(f"mean over the second half: cpu {sum(a[half:]) / len(a[half:]):.5f}, gpu {sum(b[half:]) / len(b[half:]):.5f}")
EOF
CUDA_VISIBLE_DEVICES="" timeout 60 python -m diffspace sample "$OUT/gpu" -n 16 --out "$OUT/gpu-on-cpu.png" || failed 1b-sample $?

part "1c. sample and eval on $DEVICE (--device), and eval on the cpu beside it"
timeout 60 python -m diffspace sample "$OUT/gpu" -n 256 --device "$DEVICE" --out "$OUT/gpu-samples.png" || failed 1c-sample $?
for where in "$DEVICE" cpu; do
  timeout 150 python -m diffspace eval "$OUT/gpu" -n 200 --nll-samples 32 --vlb-steps 100 --pf-ode-steps 8 --device "$where" \
    | grep -E "FD \(digits|NLL bound|probability-flow ODE.*bits/dim \|" | sed "s/^/$where: /" || failed "1c-eval-$where" $?
done
fi

COMPILE=$([ "$QUICK" = 1 ] && echo false || echo true)
if want 2; then
part "2. bf16 + channels_last + compile on the digits"
timeout 200 python -m diffspace train "${RUN[@]}" "train.device=$DEVICE" train.bf16=true train.channels_last=true \
  "train.compile=$COMPILE" --out "$OUT/fast" || failed 2 $?
python - "$OUT" <<'EOF' || failed 2-compare $?
import csv, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = {r: list(csv.DictReader(open(out / r / "metrics.csv"))) for r in ("gpu", "fast")}
print("final loss fp32 %s, bf16+compile %s; samples/s fp32 %s, bf16+compile %s" % (
    rows["gpu"][-1]["loss"], rows["fast"][-1]["loss"], rows["gpu"][-1]["samples_per_s"], rows["fast"][-1]["samples_per_s"]))
EOF
fi

if want 3; then
part "3. throughput, CIFAR-10 U-Net, bf16"
if [ "$QUICK" = 1 ]; then
  timeout 300 python benchmarks/throughput.py --device "$DEVICE" --quick | tee "$OUT/throughput.md" || failed 3 $?
else
  # eager tables first: the compiled one (which times the eager cases again) has timed out before, cause unknown
  timeout 150 python benchmarks/throughput.py --device "$DEVICE" --layouts cifar10 --batch 128 --reps 10 \
    | tee "$OUT/throughput.md" || failed 3 $?
  timeout 150 python benchmarks/throughput.py --device "$DEVICE" --layouts cifar10 --batch 512 --reps 5 \
    | tee "$OUT/throughput-512.md" || failed 3-512 $?
  timeout 480 python benchmarks/throughput.py --device "$DEVICE" --layouts cifar10 --batch 128 --reps 10 --compile \
    | tee "$OUT/throughput-compiled.md" || failed 3-compiled $?
fi
fi

python - "$OUT/cifar-synthetic.bin" <<'EOF'
import sys
import numpy as np
rng = np.random.default_rng(0)
records = np.concatenate([rng.integers(0, 10, (5000, 1)), rng.integers(0, 256, (5000, 3072))], axis=1)
open(sys.argv[1], "wb").write(records.astype(np.uint8).tobytes())  # 1 label byte + 3,072 pixel bytes each
EOF
if want 4; then
part "4. the CIFAR-10 DDPM recipe through the trainer (synthetic data in the binary format)"
CIFAR_STEPS=$([ "$QUICK" = 1 ] && echo 4 || echo 150)
for compile in false $COMPILE; do
  timeout 150 python -m diffspace train configs/cifar10-ddpm.toml "data.spec=$OUT/cifar-synthetic.bin" --quiet \
    "train.device=$DEVICE" "train.compile=$compile" log.every=$((CIFAR_STEPS / 5 > 0 ? CIFAR_STEPS / 5 : 1)) \
    log.sample_every=0 "log.checkpoint_every=$CIFAR_STEPS" sample.sampler=ddim sample.nfe=10 --steps "$CIFAR_STEPS" \
    --out "$OUT/cifar-compile-$compile" \
    $([ "$QUICK" = 1 ] && echo model.base_channels=16) || failed "4 (compile $compile)" $?
  echo "compile=$compile: samples/s every $((CIFAR_STEPS / 5)) steps:" \
    $(cut -d, -f5 "$OUT/cifar-compile-$compile/metrics.csv" 2>/dev/null | tail -n +2)
  [ "$compile" = "$COMPILE" ] && break
done
fi

if want 4b && [ "$DEVICE" = cuda ]; then
  part "4b. host-device syncs per training step (torch.cuda.set_sync_debug_mode), the DDPM recipe at base 32"
  timeout 240 python - "$OUT" <<'EOF' || failed 4b $?
import sys, warnings
import torch
from diffspace.cli import main
out = sys.argv[1]
def syncs(steps):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        main(["train", "configs/cifar10-ddpm.toml", f"data.spec={out}/cifar-synthetic.bin", "--quiet", "train.device=cuda",
              "model.base_channels=32", "log.every=10", "log.sample_every=0", "log.n_samples=4", "sample.sampler=ddim",
              "sample.nfe=10", "--steps", str(steps), "--out", f"{out}/syncs-{steps}"])
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in seen if "synchroniz" in str(w.message)]
a, b = syncs(20), syncs(40)
print(f"synchronizing calls: 20 steps {len(a)}, 40 steps {len(b)}: {(len(b) - len(a)) / 20:.2f} per step "
      "(tests/test_host_syncs.py expects 2 more for 20 more steps: one read-back per log row)")
EOF
fi

if want 5 && [ "$GPUS" -ge 2 ]; then
  part "5. torchrun, 2 GPUs (NCCL)"
  NVIDIA_TF32_OVERRIDE=0 timeout 300 torchrun --standalone --nproc_per_node 2 -m diffspace train "${RUN[@]}" \
    train.device=cuda --out "$OUT/gpu2" || failed 5 $?
  paste -d, <(cut -d, -f1,2 "$OUT/gpu/metrics.csv") <(cut -d, -f2 "$OUT/gpu2/metrics.csv") | tail -5
  timeout 150 torchrun --standalone --nproc_per_node 2 -m diffspace eval "$OUT/gpu" -n 200 --nll-samples 300 --pf-ode-steps 8 \
    --vlb-steps 100 --device cuda | grep -E "FD \(digits|NLL bound" || failed 5-eval $?
elif want 5; then
  part "5. skipped: fewer than two GPUs"
fi
echo "done: $OUT"
