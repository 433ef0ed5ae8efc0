#!/usr/bin/env bash
# The GPU measurements of issue 11 in one call (a lent GPU's time is short): environment, import profile,
# embed images --decode cpu|gpu for ViT-B-32 (20,000 JPEGs, batch 256) and ViT-L-14 (gpu path).
# Results (JSON + logs) go to OUTDIR.       benchmarks/gpu_session.sh OUTDIR [N] [DEVICE]
set -u
out=${1:-gpu-bench}; n=${2:-20000}; device=${3:-cuda}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv >"$out/gpu.txt" 2>&1
nproc >>"$out/gpu.txt"
$py -c "import torch, torchvision, open_clip; print('torch', torch.__version__, 'torchvision', torchvision.__version__,
'open_clip', open_clip.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name(0))" 2>&1 | tee -a "$out/gpu.txt"
$py -X importtime -c "import vlmtools.cli.app, vlmtools.embed, torch, open_clip" 2>"$out/importtime.txt"
sort -t'|' -k2 -n "$out/importtime.txt" | tail -12
timeout 240 $py benchmarks/bench_embed.py --model ViT-B-32 --pretrained none --device "$device" --n "$n" \
    --batch-size 256 --distinct 256 --json "$out/embed_b32.json" 2>&1 | tee "$out/embed_b32.log" | tail -4
timeout 120 $py benchmarks/bench_embed.py --model ViT-L-14 --pretrained none --device "$device" --n $((n * 3 / 10)) \
    --batch-size 256 --distinct 256 --decodes gpu --json "$out/embed_l14.json" 2>&1 | tee "$out/embed_l14.log" | tail -2
