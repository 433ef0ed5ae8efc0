#!/usr/bin/env bash
# Reproduce study 003 ("Attention Lattice Adapter", JSAI 2024) on CUB-200-2011 with its segmentation masks:
# train ALA on a frozen CLIP image tower, explain the test images with ALA and RISE (and Grad-CAM, attention
# rollout on ViTs), and score the maps: mean IoU against the masks, insertion, deletion, ID score. Also the
# study's ablation: (i) AEA without the side branch network (the last layer only), (ii) the side branch
# without AEA. Ends with one table, mean ± sd over seeds: ours, the study's, the difference
# (OUT/table.tsv, OUT/table.txt). F-CAM is not implemented: its row has the study's figures only.
#
#   examples/cub/reproduce_ala.sh CUB_200_2011_ROOT SEGMENTATIONS_DIR [OUT_DIR]
#
# Inputs: CUB-200-2011 and its segmentation archive (segmentations/<class>/<image>.png); the open_clip
# weights (network once, then the Hugging Face cache). The study's split is train 5,000 / val 994 / test
# 5,794; CUB ships train 5,994 / test 5,794, so the val images here are a seeded, class-stratified 994/5994
# of CUB's train split (--val-fraction 0.1658), not the study's exact ones. Environment:
#   MODEL, PRETRAINED  open_clip model and tag     [ViT-B-32, openai] (the slides do not name the backbone)
#   DEVICE             auto | cpu | cuda:N         [auto]
#   SEEDS              seeds of ALA and RISE       [0 1 2]
#   EPOCHS             ALA's most epochs           [50]
#   MASKS              RISE's masks per image      [4000]
#   LIMIT              test images explained, 0 = all  [0]
#   STEPS              insertion/deletion in N coarse steps (not the study's protocol; smoke runs)  [unset: RISE's 224 px per step]
#   ABLATION           1: also the ablation rows (i) and (ii)  [1]
#   ROLLOUT            auto | 1 | 0: attention rollout (auto: for models named ViT-*; it needs a ViT)  [auto]
#   VLMTOOLS           the vlmtools command         [vlmtools]
#   BATCH              1: the commands in one vlmtools process; 0: one process per command  [1]
# Every step resumes or is skipped when its output exists (the feature cache resumes shard by shard).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

if [ $# -lt 2 ] || [ $# -gt 3 ]; then die "usage: $SCRIPT CUB_200_2011_ROOT SEGMENTATIONS_DIR [OUT_DIR]"; fi
ROOT=$1
SEG=$2
OUT=${3:-ala-repro}
MODEL=${MODEL:-ViT-B-32}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
SEEDS=${SEEDS:-"0 1 2"}
EPOCHS=${EPOCHS:-50}
MASKS=${MASKS:-4000}
LIMIT=${LIMIT:-0}
STEPS=${STEPS:-}
ABLATION=${ABLATION:-1}
ROLLOUT=${ROLLOUT:-auto}
need_dir "$ROOT" "CUB_200_2011_ROOT"
need_dir "$SEG" "SEGMENTATIONS_DIR"
mkdir -p "$OUT/maps"
spec=(--model "$MODEL" --pretrained "$PRETRAINED" --device "$DEVICE")
test_images=(--where split=test --limit "$LIMIT" --no-overlays)

step "1. every image with its mask (split train | test)"
batch data
if [ ! -s "$OUT/cub.jsonl" ]; then vlm data cub "$ROOT" --segmentations "$SEG" -o "$OUT/cub.jsonl"; fi
run_batch

batch "$MODEL"
step "2. ALA per seed (the tower's features of every layer cached once: ~0.9 MB per image for ViT-B-32 at 224 px), and the maps of the test images"
# variants NAME:CACHE:OPTION: the study's ALA; with ABLATION=1 also (i) AEA, no SBN: the side branch reads
# the last layer only (its own feature cache); (ii) SBN, no AEA: every layer, never frozen. The maps are
# each image's own top class's.
variants=("ala:features:")
if [ "$ABLATION" = 1 ]; then variants+=("ala-i:features-last:--layers=-1" "ala-ii:features:--no-aea"); fi
maps=()
for s in $SEEDS; do
  for v in "${variants[@]}"; do
    IFS=: read -r name cache option <<< "$v"
    extra=()
    if [ -n "$option" ]; then extra=("$option"); fi
    if [ ! -s "$OUT/$name-s$s.json" ]; then
      vlm train ala "$OUT/cub.jsonl" -o "$OUT/$name-s$s" --cache "$OUT/$cache" --where split=train \
        --val-fraction 0.1658 --epochs "$EPOCHS" --seed "$s" "${extra[@]}" "${spec[@]}"
    fi
    if [ ! -s "$OUT/maps/$name-s$s/maps.jsonl" ]; then
      vlm explain visual "$OUT/cub.jsonl" "${test_images[@]}" --method ala --head "$OUT/$name-s$s" \
        --device "$DEVICE" -o "$OUT/maps/$name-s$s" --force
    fi
    maps+=("$OUT/maps/$name-s$s")
  done
  if [ ! -s "$OUT/maps/rise-s$s/maps.jsonl" ]; then
    vlm explain visual "$OUT/cub.jsonl" "${test_images[@]}" --method rise --masks "$MASKS" --seed "$s" \
      --batch-size 250 "${spec[@]}" -o "$OUT/maps/rise-s$s" --force
  fi
  maps+=("$OUT/maps/rise-s$s")
done

step "3. Grad-CAM and attention rollout (one run each: they draw nothing at random)"
if [ ! -s "$OUT/maps/gradcam/maps.jsonl" ]; then
  vlm explain visual "$OUT/cub.jsonl" "${test_images[@]}" --method gradcam "${spec[@]}" -o "$OUT/maps/gradcam" --force
fi
maps+=("$OUT/maps/gradcam")
case "$ROLLOUT:$MODEL" in
  0:*) skip "attention rollout (ROLLOUT=0)" ;;
  auto:ViT-*|auto:*/ViT-*|1:*)
    if [ ! -s "$OUT/maps/rollout/maps.jsonl" ]; then
      vlm explain visual "$OUT/cub.jsonl" "${test_images[@]}" --method rollout "${spec[@]}" -o "$OUT/maps/rollout" --force
    fi
    maps+=("$OUT/maps/rollout") ;;
  *) skip "attention rollout: $MODEL is not a ViT (rollout reads a ViT's attention; ROLLOUT=1 tries anyway)" ;;
esac

# as the study: mIoU by the ALA authors' rule (8-bit grey > 127), insertion and deletion as RISE's CausalMetric
# (224 px per step at 224 px), each map scored by its own model (ALA maps by their head)
step "4. mIoU, insertion, deletion, ID score"
coarse=()
if [ -n "$STEPS" ]; then coarse=(--steps "$STEPS"); fi
vlm eval explanations "${maps[@]}" --manifest "$OUT/cub.jsonl" "${coarse[@]}" --device "$DEVICE" \
  -o "$OUT/eval.jsonl" --summary "$OUT/summary.json"
run_batch

step "5. ours beside the study's"
"$PYTHON" - "$OUT/summary.json" > "$OUT/ours.tsv" <<'PY'
import json, os, re, sys

rows = {"ala": [("methods", "ALA (ours)"), ("ablation", "(iii) AEA + SBN")], "rise": [("methods", "RISE")],
        "ala-i": [("ablation", "(i) AEA, no SBN")], "ala-ii": [("ablation", "(ii) SBN, no AEA")],
        "gradcam": [("methods", "Grad-CAM")], "rollout": [("methods", "attention rollout")]}
columns = [("iou", "mIoU"), ("insertion", "insertion"), ("deletion", "deletion"), ("id_score", "ID score")]
print("table\trow\tcolumn\tvalue")
for d in json.load(open(sys.argv[1]))["directories"]:  # one line per maps directory: a seed's run
    name = re.sub(r"-s\d+$", "", os.path.basename(os.path.normpath(d["maps"])))
    for table, row in rows[name]:
        for key, column in columns:
            print(f"{table}\t{row}\t{column}\t{d[key]:.6f}")
PY
compare_table "$HERE/study_003.tsv" "$OUT/ours.tsv" "study 003: CUB test, visual explanations (mean ± sd over seeds), ours beside the study's"
