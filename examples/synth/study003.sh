#!/usr/bin/env bash
# Study 003 (Attention Lattice Adapter) on the offline world: the README's table. ALA, RISE, Grad-CAM and
# (ViT models) attention rollout; mIoU by the ALA authors' rule with the lattice ceiling, insertion and
# deletion as RISE's CausalMetric scored by each map's own model, and the grounding of per-descriptor maps.
#
#   examples/synth/study003.sh [OUT_DIR]
# Environment:
#   MODEL      packaged micro CLIP                     [vlmtools-micro]
#   CLASSES, PER_CLASS, WORLD_SEED   the world         [10, 20, 0]
#   SEEDS      seeds of ALA and RISE                   [0 1 2]
#   MASKS      RISE masks (the study: 4000)            [500]
#   EPOCHS     ALA epochs (all of them: 10 val images cannot pick an epoch) [30]
#   LAYER      Grad-CAM's second layer (ResNet stage or ViT block) [2]
# Classes are scored by the world's oracle descriptors (--cbd): its class names mean nothing to the model.
# Every step is skipped when its output exists.
set -euo pipefail
OUT=${1:-study003}
MODEL=${MODEL:-vlmtools-micro}
SEEDS=${SEEDS:-"0 1 2"}
MASKS=${MASKS:-500}
EPOCHS=${EPOCHS:-30}
LAYER=${LAYER:-2}
VLM=${VLMTOOLS:-vlmtools}
mkdir -p "$OUT/maps" "$OUT/desc"
W="$OUT/world"
[ -s "$W/manifest.jsonl" ] || $VLM synth make "$W" --classes "${CLASSES:-10}" --per-class "${PER_CLASS:-20}" \
    --seed "${WORLD_SEED:-0}"
test=(--where split=test --no-overlays)
cbd=(--cbd "$W/descriptors.jsonl")
for s in $SEEDS; do
  [ -s "$OUT/ala-s$s.json" ] || $VLM train ala "$W/manifest.jsonl" -m "$MODEL" -o "$OUT/ala-s$s" \
      --cache "$OUT/features" --where split=train --val-fraction 0 --epochs "$EPOCHS" --seed "$s" >/dev/null
  [ -s "$OUT/maps/ala-s$s/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
      --method ala --head "$OUT/ala-s$s" -o "$OUT/maps/ala-s$s"
  [ -s "$OUT/maps/rise-s$s/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
      -m "$MODEL" --method rise --masks "$MASKS" --seed "$s" -o "$OUT/maps/rise-s$s"
done
[ -s "$OUT/maps/gradcam/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
    -m "$MODEL" -o "$OUT/maps/gradcam"
[ -s "$OUT/maps/gradcam-l$LAYER/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
    -m "$MODEL" --layer "$LAYER" -o "$OUT/maps/gradcam-l$LAYER"
if $VLM explain visual "$W/manifest.jsonl" "${test[@]}" --limit 1 -m "$MODEL" --method rollout -o "$OUT/probe" \
    >/dev/null 2>&1; then  # a ViT tower
  rm -rf "$OUT/probe"
  [ -s "$OUT/maps/rollout/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
      -m "$MODEL" --method rollout -o "$OUT/maps/rollout"
fi
# per-descriptor maps for the grounding table (Grad-CAM at the finer layer, RISE seed 0)
[ -s "$OUT/desc/gradcam-l$LAYER/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
    -m "$MODEL" --layer "$LAYER" --descriptors "$W/descriptors.jsonl" -o "$OUT/desc/gradcam-l$LAYER"
[ -s "$OUT/desc/rise/maps.jsonl" ] || $VLM explain visual "$W/manifest.jsonl" "${test[@]}" "${cbd[@]}" \
    -m "$MODEL" --method rise --masks "$MASKS" --descriptors "$W/descriptors.jsonl" -o "$OUT/desc/rise"

$VLM eval explanations "$OUT"/maps/* --manifest "$W/manifest.jsonl" -o "$OUT/eval.jsonl" --summary "$OUT/summary.json"
# ALA maps under the one CLIP judge too (the other maps' own scorer is that judge already)
$VLM eval explanations "$OUT"/maps/ala-s* --manifest "$W/manifest.jsonl" --scorer clip -o "$OUT/eval-clip.jsonl" \
    --summary "$OUT/summary-clip.json"
$VLM eval explanations "$OUT"/desc/* --manifest "$W/manifest.jsonl" --descriptors -o "$OUT/grounding.jsonl" \
    --summary "$OUT/grounding.json"
