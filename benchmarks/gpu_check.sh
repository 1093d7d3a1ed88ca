#!/usr/bin/env bash
# The device checks, in one call of at most 8 minutes (benchmarks/README.md, "GPU"):
#   1. the CUDA tests (they skip on a machine without a GPU);
#   2. two epochs of `saf train` per method on the GPU (the trainer's --device path);
#   3. resnet18 on synthetic CIFAR-shaped tensors (3x32x32, 10 classes: no CIFAR files are
#      on any machine), batch 128: SGD, SAF, MESA and SAM images/s and ratios to SGD,
#      measured side by side, against the paper's 3,289 / 3,213 / 2,780 / 1,657 images/s;
#   4. the same resnet18 batch: one HVP (plain, through the kept graph, unfolded) against one
#      training step, time and allocator peak (hvp_scale.py);
#   5. a 2D surface of resnet_small on 256 CIFAR-shaped images (surface.py);
#   6. the sharpness monitor every 50 steps on resnet18, batch 128, a 256-sample probe: warm
#      Lanczos to tol 1e-3, then a budget of 2 products per warm measurement (monitor.py).
# On the device machine (python3 with CUDA torch; wheels/ may hold plotly and mnist1d
# wheels, installed with --no-deps):
#   bash benchmarks/gpu_check.sh [OUT]          # logs and JSON under OUT (default $OUT or .)
set -uo pipefail
out=${1:-${OUT:-.}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
for w in wheels/*.whl; do [ -e "$w" ] && $py -m pip install -q --no-deps "$w"; done
$py -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" \
    | tee "$out/gpu_env.txt"
timeout 70 $py -m pytest -q -p no:cacheprovider -k cuda tests/analysis/test_hvp.py 2>&1 \
    | tail -3 | tee "$out/gpu_tests.txt"
for m in sgd saf mesa sam; do
    timeout 30 $py -m cli train --method $m --model resnet_small --epochs 2 --device cuda \
        --out "$out/train-$m" --no-progress 2>&1 | tail -2
done | tee "$out/gpu_train.txt"
rm -rf "$out"/train-*
timeout 120 $py benchmarks/train_cost.py --model resnet18 --data cifar-shaped --device cuda \
    --methods sgd,saf,mesa,sam --steps 300 --json "$out/gpu_train_cost.json" 2>&1 \
    | tee "$out/gpu_train_cost.txt"
timeout 60 $py benchmarks/hvp_scale.py --device cuda --reps 5 --out "$out/gpu_hvp.json" 2>&1 \
    | tee "$out/gpu_hvp.txt"
timeout 40 $py benchmarks/surface.py --device cuda --steps 11 --json "$out/gpu_surface.json" \
    2>&1 | tail -9 | tee "$out/gpu_surface.txt"
for budget in "" "--max-iter 2"; do
    timeout 35 $py benchmarks/monitor.py --device cuda --steps 100 --every 50 $budget 2>&1 | tail -8
done | tee "$out/gpu_monitor.txt"
