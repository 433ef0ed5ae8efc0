#!/usr/bin/env bash
# Reproduce study 004 (LARE), Table 1: train on CUB-200-2011's train split (photos), test on CUB's test
# split (in-domain) and on CUB-200-Paintings (out-of-domain). Rows: CLIP and CoCa zero-shot ("a photo of a
# {}."), CLIP and CoCa linear probes ("fine-tuning"), LADS on CLIP (as its authors) and LARE on CoCa (as
# the study). Ends with one table, mean ± sd over seeds: ours, the study's, the difference (OUT/table.tsv,
# OUT/table.txt).
#
#   examples/cub/reproduce_lare.sh CUB_200_2011_ROOT CUB_200_PAINTING_ROOT [OUT_DIR]
#
# Inputs: CUB-200-2011; CUB-200-Paintings as class folders named as CUB's ("001.Black_footed_Albatross/");
# the open_clip weights of both models (network once, then the Hugging Face cache). Environment:
#   CLIP_MODEL / CLIP_PRETRAINED   [ViT-L-14 / openai]
#   COCA_MODEL / COCA_PRETRAINED   [coca_ViT-L-14 / laion2b_s13b_b90k]
#   SEEDS     runs per trained row (the study: 5)   [5]
#   SAMPLES   LARE's K, points drawn per box        [10]
#   EPOCHS    most epochs of each probe             [100]
#   DEVICE    auto | cpu | cuda:N                   [auto]
#   VLMTOOLS  the vlmtools command                  [vlmtools]
#   BATCH     1: each model's commands in one vlmtools process; 0: one process per command  [1]
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

if [ $# -lt 2 ] || [ $# -gt 3 ]; then die "usage: $SCRIPT CUB_200_2011_ROOT CUB_200_PAINTING_ROOT [OUT_DIR]"; fi
CUB=$1
PAINT=$2
OUT=${3:-lare-repro}
CLIP=(--model "${CLIP_MODEL:-ViT-L-14}" --pretrained "${CLIP_PRETRAINED:-openai}")
COCA=(--model "${COCA_MODEL:-coca_ViT-L-14}" --pretrained "${COCA_PRETRAINED:-laion2b_s13b_b90k}")
SEEDS=${SEEDS:-5}
SAMPLES=${SAMPLES:-10}
EPOCHS=${EPOCHS:-100}
DEVICE=${DEVICE:-auto}
need_dir "$CUB" "CUB_200_2011_ROOT"
need_dir "$PAINT" "CUB_200_PAINTING_ROOT"
P="$OUT/predictions"
mkdir -p "$P" "$OUT/heads"

step "1. one manifest: CUB train + test (domain photo) and the paintings (split test, domain painting)"
batch data
if [ ! -s "$OUT/cub.jsonl" ]; then vlm data cub "$CUB" --domain photo -o "$OUT/cub.jsonl"; fi
if [ ! -s "$OUT/paint.jsonl" ]; then
  vlm data folder "$PAINT" --names cub --split test --domain painting -o "$OUT/paint.jsonl"
fi
run_batch
cat "$OUT/cub.jsonl" "$OUT/paint.jsonl" > "$OUT/all.jsonl.tmp"
mv "$OUT/all.jsonl.tmp" "$OUT/all.jsonl"

# per model (one batch each, so each model loads once): embed, zero-shot, heads per seed, predictions,
# accuracy per domain. Rows: NAME:MODEL:how (zs = zero-shot, probe, lads, lare).
train=(--where split=train --epochs "$EPOCHS" --device "$DEVICE")
test_rows=(--where split=test --device "$DEVICE")
runs=()
for model in clip coca; do
  if [ "$model" = clip ]; then spec=("${CLIP[@]}"); else spec=("${COCA[@]}"); fi
  store="$OUT/$model"
  batch "$model"
  step "2. $model: embeddings, zero-shot, heads per seed"
  vlm embed images "$OUT/all.jsonl" -o "$store" "${spec[@]}" --device "$DEVICE"
  vlm classify "$store" "${test_rows[@]}" -o "$P/$model-zs.jsonl"
  runs+=("$model-zs")
  heads="probe"
  if [ "$model" = clip ]; then heads="$heads lads"; else heads="$heads lare"; fi
  for ((s = 0; s < SEEDS; s++)); do
    for h in $heads; do
      name="$model-$h-s$s"
      case $h in
        probe) vlm train probe "$store" -o "$OUT/heads/$name" "${train[@]}" --seed "$s" ;;
        lads) vlm train lads "$store" -o "$OUT/heads/$name" "${train[@]}" --seed "$s" \
                --source "a photo of a {}." --target "a painting of a {}." ;;
        lare) vlm train lare "$store" -o "$OUT/heads/$name" "${train[@]}" --seed "$s" --samples "$SAMPLES" ;;
      esac
      vlm classify "$store" --head "$OUT/heads/$name" "${test_rows[@]}" -o "$P/$name.jsonl"
      runs+=("$name")
    done
  done
  for run in "${runs[@]}"; do
    if [ "${run%%-*}" = "$model" ]; then vlm -q eval "$P/$run.jsonl" --by domain -o "$P/$run.eval.jsonl"; fi
  done
  run_batch
done

step "3. ours beside the study's"
"$PYTHON" - "$P" "${runs[@]}" > "$OUT/ours.tsv" <<'PY'
import json, re, sys

rows = {"clip-zs": "CLIP (zero-shot)", "coca-zs": "CoCa (zero-shot)", "clip-probe": "CLIP (fine-tuning)",
        "coca-probe": "CoCa (fine-tuning)", "clip-lads": "LADS", "coca-lare": "LARE"}
columns = {"photo": "in-domain", "painting": "out-of-domain"}
print("table\trow\tcolumn\tvalue")
for run in sys.argv[2:]:  # one line per run (seed) and domain
    for rec in map(json.loads, open(f"{sys.argv[1]}/{run}.eval.jsonl")):
        if rec.get("kind") == "group" and rec.get("by") == "domain" and rec.get("value") in columns:
            print(f"Table 1\t{rows[re.sub(r'-s[0-9]+$', '', run)]}\t{columns[rec['value']]}\t{100 * rec['acc1']:.4f}")
PY
compare_table "$HERE/study_004.tsv" "$OUT/ours.tsv" "study 004, Table 1: top-1 (%), mean ± sd over $SEEDS seeds, ours beside the study's"
