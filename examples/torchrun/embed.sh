#!/bin/bash
# Embed with one process per GPU on one machine under torchrun: torchrun sets RANK and WORLD_SIZE, which
# `vlmtools embed images` reads; each rank writes the store shards k with k % WORLD_SIZE == RANK, and
# the last rank to finish writes the final info.json. No process group is needed (ranks share only the
# store directory), so --no-python runs the CLI directly. Rerun to resume.
#
#   examples/torchrun/embed.sh manifest.jsonl store/ 4
#   examples/torchrun/embed.sh '/data/shards/{00000..00099}.tar' store/ 8
set -euo pipefail
INPUT=${1:?usage: embed.sh INPUT STORE [GPUS]}
STORE=${2:?usage: embed.sh INPUT STORE [GPUS]}
GPUS=${3:-$(nvidia-smi -L 2>/dev/null | wc -l)}
CPUS=$(nproc)
# each rank sees one GPU: torchrun's LOCAL_RANK picks it
torchrun --standalone --nproc-per-node "$GPUS" --no-python bash -c '
  CUDA_VISIBLE_DEVICES=$LOCAL_RANK exec vlmtools embed images "$0" -o "$1" --device cuda --decode auto \
    --batch-size 256 --workers $(( $2 / LOCAL_WORLD_SIZE - 1 > 0 ? $2 / LOCAL_WORLD_SIZE - 1 : 1 ))
' "$INPUT" "$STORE" "$CPUS"
