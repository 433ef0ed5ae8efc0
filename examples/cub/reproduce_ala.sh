#!/usr/bin/env bash
# Reproduce the ALA study (study 003, "Attention Lattice Adapter") on CUB-200-2011 with segmentation
# masks: train ALA on a frozen CLIP image tower, explain the test images with ALA and RISE (and
# Grad-CAM, rollout), and print mIoU / insertion / deletion / ID score beside the study's numbers:
#   ALA   0.693 / 0.704 / 0.007 / 0.697      RISE 0.390 / 0.604 / 0.086 / 0.522   (mean over 3 seeds)
#
#   examples/cub/reproduce_ala.sh /data/CUB_200_2011 /data/segmentations [OUT_DIR]
#
# NOT RUN by the vlmtools authors: it needs CLIP weights (network or a Hugging Face cache) and, to finish
# in reasonable time, a GPU (RISE with 4000 masks is 4000 forward passes per image). The study's split is
# train 5,000 / val 994 / test 5,794; CUB ships train 5,994 / test 5,794, so the val images here are a
# seeded, class-stratified 994/5994 of CUB's train split (--val-fraction 0.1658), not the study's exact ones.
# Environment:
#   MODEL, PRETRAINED   open_clip model and tag   [ViT-B-32, openai]  (the study's backbone is not stated
#                       in the slides; change it here)
#   DEVICE              auto | cpu | cuda:N       [auto]
#   SEEDS               seeds of ALA and RISE     [0 1 2]
#   MASKS               RISE masks                [4000]
#   VLMTOOLS            the vlmtools command      [vlmtools]
# Every step resumes or is skipped when its output exists (the feature cache resumes shard by shard).
set -euo pipefail

ROOT=${1:?usage: $0 CUB_200_2011_ROOT SEGMENTATIONS_DIR [OUT_DIR]}
SEG=${2:?usage: $0 CUB_200_2011_ROOT SEGMENTATIONS_DIR [OUT_DIR]}
OUT=${3:-ala-repro}
MODEL=${MODEL:-ViT-B-32}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
SEEDS=${SEEDS:-"0 1 2"}
MASKS=${MASKS:-4000}
VLM=${VLMTOOLS:-vlmtools}
spec=(--model "$MODEL" --pretrained "$PRETRAINED" --device "$DEVICE")
mkdir -p "$OUT"

# 1. data: every image with its segmentation mask (split = train | test)
[ -s "$OUT/cub.jsonl" ] || $VLM data cub "$ROOT" --segmentations "$SEG" -o "$OUT/cub.jsonl"

# 2. ALA per seed: tower features of every layer cached once (shared cache; ~0.9 MB per image for
#    ViT-B-32 at 224 px, ~11 GB for CUB), then the head
for s in $SEEDS; do
  [ -s "$OUT/ala-s$s.json" ] || $VLM train ala "$OUT/cub.jsonl" -o "$OUT/ala-s$s" --cache "$OUT/features" \
      --where split=train --val-fraction 0.1658 --epochs 50 --seed "$s" "${spec[@]}"
done

# 3. maps of the test images, each for the class the CLIP model predicts among CUB's 200 (the input is a
#    manifest, so the classes are its labels and the explained class is the model's own top class)
for s in $SEEDS; do
  [ -s "$OUT/maps/ala-s$s/maps.jsonl" ] || $VLM explain visual "$OUT/cub.jsonl" --where split=test --no-overlays \
      --method ala --head "$OUT/ala-s$s" --device "$DEVICE" -o "$OUT/maps/ala-s$s"
  [ -s "$OUT/maps/rise-s$s/maps.jsonl" ] || $VLM explain visual "$OUT/cub.jsonl" --where split=test --no-overlays \
      --method rise --masks "$MASKS" --seed "$s" --batch-size 250 "${spec[@]}" -o "$OUT/maps/rise-s$s"
done
[ -s "$OUT/maps/gradcam/maps.jsonl" ] || $VLM explain visual "$OUT/cub.jsonl" --where split=test --no-overlays \
    --method gradcam "${spec[@]}" -o "$OUT/maps/gradcam"
[ -s "$OUT/maps/rollout/maps.jsonl" ] || $VLM explain visual "$OUT/cub.jsonl" --where split=test --no-overlays \
    --method rollout "${spec[@]}" -o "$OUT/maps/rollout"

# 4. evaluate as the study: mIoU by the ALA authors' rule (8-bit grey > 127), insertion and deletion as
#    RISE's CausalMetric (224 px per step at 224 px), each map scored by its own model (ALA maps by their
#    head); mean ± std over seeds
$VLM eval explanations "$OUT"/maps/* --manifest "$OUT/cub.jsonl" --device "$DEVICE" \
    -o "$OUT/eval.jsonl" --summary "$OUT/summary.json"
python3 - "$OUT/summary.json" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
paper = {"ala": (0.693, 0.704, 0.007, 0.697), "rise": (0.390, 0.604, 0.086, 0.522)}
print(f"{'method':8} {'mIoU':>14} {'Ins':>14} {'Del':>14} {'ID':>14}   study")
for m in s["methods"]:
    cells = [f"{m[k]:.3f}±{m[k + '_std']:.3f}" for k in ("iou", "insertion", "deletion", "id_score")]
    ref = " / ".join(f"{v:.3f}" for v in paper.get(m["method"], ())) or "-"
    print(f"{m['method']:8} " + " ".join(f"{c:>14}" for c in cells) + f"   {ref}")
PY
