#!/usr/bin/env bash
# Study 004's Table 1 in the offline world: train on photos, test on held-out photos (in-domain) and
# held-out paintings (out-of-domain), with the micro CLIP (vlmtools-micro). Rows: CLIP zero-shot (class
# names), CBD zero-shot (oracle descriptors), probe, LADS, LARE (T from the descriptors, and from the
# names); mean (±std) over --seeds runs.
#
#   examples/synth/lare.sh [OUT_DIR] [--seeds N]          (default: lare-synth, 5 seeds)
#
# Environment: CLASSES [20], PER_CLASS [60], SAMPLES (LARE's K) [10], DEVICE [cpu],
# VLMTOOLS (the vlmtools command) [vlmtools]. No network. The table goes to stdout and OUT/table.tsv.
#
# Caveats (say them beside the numbers):
# - the micro CLIP was trained on photos AND paintings of this world, so "out-of-domain" paintings are
#   not unseen by the encoder, only by the probe;
# - the classes have made-up names that tell the micro CLIP nothing, so CLIP zero-shot is at chance and
#   LARE's class text embeddings T come from the oracle descriptors (--descriptors), not from names;
#   LADS uses the study's prompts "a photo of a {}." -> "a painting of a {}." (its shift is the domain
#   words' shift; its class-consistency term sees names only);
# - there is no trained CoCa offline (vlmtools-tiny-coca has random weights): no CoCa row here.
set -euo pipefail

OUT=lare-synth
SEEDS=5
while [ $# -gt 0 ]; do
  case "$1" in
    --seeds) SEEDS=${2:?--seeds N}; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) OUT=$1; shift ;;
  esac
done
CLASSES=${CLASSES:-20}
PER_CLASS=${PER_CLASS:-60}
SAMPLES=${SAMPLES:-10}
DEVICE=${DEVICE:-cpu}
VLM=${VLMTOOLS:-vlmtools}
P="$OUT/predictions"
mkdir -p "$P"

# 1. the world (photos and paintings) and its micro-CLIP store
[ -s "$OUT/world/world.json" ] || $VLM synth make "$OUT/world" --classes "$CLASSES" --per-class "$PER_CLASS" \
  --domain both --seed 0 >/dev/null
$VLM embed images "$OUT/world/manifest.jsonl" -o "$OUT/store" --model vlmtools-micro --device "$DEVICE"

# 2. zero-shot rows (no training, one run)
test_rows=(--where split=test)
$VLM classify "$OUT/store" --method clip "${test_rows[@]}" -o "$P/clip-zs.jsonl" --device "$DEVICE"
$VLM classify "$OUT/store" --method cbd --descriptors "$OUT/world/descriptors.jsonl" "${test_rows[@]}" \
  -o "$P/cbd-zs.jsonl" --device "$DEVICE"

# 3. trained heads, one per seed, on the photos of the train split, each with its defaults: the probe and
#    LARE's probe step solve scikit-learn's objective by L-BFGS on all train rows; LADS keeps its authors'
#    settings (10 % val rows, 200 augmenter + 400 probe epochs, the best val epochs kept)
train=(--where split=train --where domain=photo --device "$DEVICE")
runs=("CLIP zero-shot (names)=$P/clip-zs.jsonl" "CBD zero-shot (descriptors)=$P/cbd-zs.jsonl")
probe=() lads=() lare=() lare_names=()
for ((s = 0; s < SEEDS; s++)); do
  $VLM train probe "$OUT/store" -o "$OUT/heads/probe-s$s" "${train[@]}" --seed "$s"
  $VLM train lads "$OUT/store" -o "$OUT/heads/lads-s$s" "${train[@]}" --seed "$s" \
    --source "a photo of a {}." --target "a painting of a {}."
  $VLM train lare "$OUT/store" -o "$OUT/heads/lare-s$s" "${train[@]}" --seed "$s" --samples "$SAMPLES" \
    --descriptors "$OUT/world/descriptors.jsonl"
  # the class names mean nothing to the micro CLIP: LARE must not suffer from uninformative class texts
  $VLM train lare "$OUT/store" -o "$OUT/heads/lare_names-s$s" "${train[@]}" --seed "$s" --samples "$SAMPLES"
  for m in probe lads lare lare_names; do
    $VLM classify "$OUT/store" --head "$OUT/heads/$m-s$s" "${test_rows[@]}" -o "$P/$m-s$s.jsonl" --device "$DEVICE"
  done
  probe+=("probe (fine-tuning)=$P/probe-s$s.jsonl"); lads+=("LADS=$P/lads-s$s.jsonl"); lare+=("LARE=$P/lare-s$s.jsonl")
  lare_names+=("LARE (T from names)=$P/lare_names-s$s.jsonl")
done

# 4. the table: top-1 % on test photos (in-domain) and test paintings (out-of-domain)
$VLM eval table "${runs[@]}" "${probe[@]}" "${lads[@]}" "${lare[@]}" "${lare_names[@]}" --by domain \
  --column in-domain=photo --column out-of-domain=painting -o "$OUT/table.tsv"
$VLM explain box "$OUT/heads/lare-s0" "$OUT/store" --where split=test -o "$OUT/boxes-by-class.jsonl"
cat "$OUT/table.tsv"
