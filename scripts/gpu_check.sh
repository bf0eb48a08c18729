#!/usr/bin/env bash
# The GPU check: the whole GPU path of vqprior in one run (under 10 minutes on one H100/H200).
# Run it from the repository root on a CUDA machine where vqprior is installed (the README's
# install line); CI never runs it. Everything it writes goes under $1 (default runs/gpu_check);
# the figures end up in gpu_check.txt there.
#   1. pytest -m gpu: CPU == CUDA sampling for one seed (float64), train-prior in bf16 on CUDA
#   2. the tiny pipeline end to end on cuda in bf16 (both stages, generate, evaluate)
#   3. generate with the same seed on CPU and on CUDA: how many samples are equal (float32 and
#      TF32/bf16 rounding can flip a sample at a near tie; the rest must match)
#   4. train-prior --compile on cuda
#   5. vqprior bench --device cuda: sampling rows and the "passes" metric, training images/s of
#      the PixelCNN++ paper config, the tiny config and the default prior in fp32 and bf16,
#      eager and compiled, with peak memory
set -euo pipefail
out=${1:-runs/gpu_check}
py=${PYTHON:-python}
vq=("$py" -m vqprior)
# a dry run of the script itself on a CPU: GPU_CHECK_DEVICE=cpu GPU_CHECK_TRAIN_MODELS=pixelcnnpp-tiny
dev=${GPU_CHECK_DEVICE:-cuda}
accel=$([ "$dev" = cuda ] && echo gpu || echo cpu)
train_models=${GPU_CHECK_TRAIN_MODELS:-pixelcnnpp-paper,pixelcnnpp-tiny,prior-pixels-default}
rm -rf "$out" && mkdir -p "$out"
exec > >(tee "$out/gpu_check.txt") 2>&1
step() { echo; echo "== $* ($(date +%T))"; }

step "device"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
"$py" -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA')"

step "pytest -m gpu"
"$py" -m pytest -q -m gpu -p no:cacheprovider tests

step "tiny pipeline on cuda, bf16"
"${vq[@]}" pipeline configs/tiny/pipeline.yaml --out "$out/tiny" --accelerator "$accel" --devices 1 \
  --precision bf16-mixed
cat "$out/tiny/summary.md"

step "generate: same seed on cpu and cuda"
for d in cpu "$dev"; do
  "${vq[@]}" generate --prior "$out/tiny/prior_codes" --num 32 --seed 3 --device "$d" \
    --out "$out/gen_$d.png"
done
"$py" - "$out" "$dev" <<'PY'
import sys
from safetensors.torch import load_file
out, dev = sys.argv[1:3]
a, b = (load_file(f"{out}/gen_{d}.safetensors")["codes"] for d in ("cpu", dev))
same = (a == b).flatten(1).all(1)
print(f"generate cpu vs {dev}: {int(same.sum())}/{len(same)} samples equal "
      f"(the others diverge after a near tie), {float((a == b).float().mean()):.4f} of codes")
PY

step "train-prior --compile on cuda"
"${vq[@]}" train-prior --config configs/tiny/prior_pixels.yaml --out "$out/compiled" \
  --accelerator "$accel" --devices 1 --compile --set train.max_steps=20
test -f "$out/compiled/model/model.safetensors"

step "bench on cuda"
"${vq[@]}" bench --device "$dev" --batch-sizes 16 --train-batch 32 --train-steps 20 \
  --train-models "$train_models" --precisions fp32,bf16 \
  --compile --out "$out/bench.json"

step "done"
