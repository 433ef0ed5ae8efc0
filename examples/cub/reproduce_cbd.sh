#!/usr/bin/env bash
# Reproduce the CBD study on CUB-200-2011 (test split, 5,794 images, 200 classes):
# Menon & Vondrick's classification by description vs plain CLIP, plus the study's two prompt
# improvements (worked examples from the bird domain; background/habitat descriptors) and the
# WaffleCLIP random-descriptor control, for four CLIP sizes. Prints top-1 / top-5 beside the figures
# the study reports.
#
#   examples/cub/reproduce_cbd.sh /data/CUB_200_2011 [OUT_DIR]
#
# Needs network access (open_clip weights, the LLM) or both cached. Environment:
#   MODELS       open_clip models      [ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336]
#   PRETRAINED   pretrained tag        [openai]
#   DEVICE       auto | cpu | cuda:N   [auto]
#   LLM_MODEL    chat model for describe [gpt-4o-mini]; OPENAI_API_KEY, OPENAI_BASE_URL as usual
#   VLMTOOLS     the vlmtools command  [vlmtools]
# Every step resumes: rerunning skips finished stores and descriptor classes already written.
set -euo pipefail

ROOT=${1:?usage: $0 CUB_200_2011_ROOT [OUT_DIR]}
OUT=${2:-cbd-repro}
MODELS=${MODELS:-"ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336"}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
LLM_MODEL=${LLM_MODEL:-gpt-4o-mini}
VLM=${VLMTOOLS:-vlmtools}
STYLES="cbd domain background waffle"
mkdir -p "$OUT"

# 1. data: the test split, with the CBD paper's class names ("Black-footed Albatross")
[ -s "$OUT/test.jsonl" ] || $VLM data cub "$ROOT" --only test -o "$OUT/test.jsonl"

# 2. descriptors. cbd: the paper's prompt (lemur and television examples). domain: the worked example
#    is a bird species. background: bird example plus surroundings/habitat lines (the study's method).
#    waffle: WaffleCLIP's random words, no LLM.
$VLM describe "$OUT/test.jsonl" --style cbd --model "$LLM_MODEL" -o "$OUT/desc-cbd.jsonl"
$VLM describe "$OUT/test.jsonl" --style domain --domain "bird species" --model "$LLM_MODEL" -o "$OUT/desc-domain.jsonl"
$VLM describe "$OUT/test.jsonl" --style background --domain "bird species" --model "$LLM_MODEL" -o "$OUT/desc-background.jsonl"
$VLM describe "$OUT/test.jsonl" --style waffle --seed 0 -o "$OUT/desc-waffle.jsonl"

for M in $MODELS; do
  S="$OUT/$M"
  spec=(--model "$M" --pretrained "$PRETRAINED")
  # 3. embed images once per model, descriptors once per model and style
  $VLM embed images "$OUT/test.jsonl" -o "$S/images" "${spec[@]}" --device "$DEVICE"
  for style in $STYLES; do
    $VLM embed text "$OUT/desc-$style.jsonl" -o "$S/text-$style" "${spec[@]}" --device "$DEVICE"
  done
  # 4. classify: CLIP with the bare class name (the CBD paper's baseline) and "a photo of a {}."; CBD per style
  $VLM classify "$S/images" --method clip --templates bare -o "$S/clip-bare.jsonl" "${spec[@]}" --device "$DEVICE"
  $VLM classify "$S/images" --method clip --templates photo -o "$S/clip-photo.jsonl" "${spec[@]}" --device "$DEVICE"
  for style in $STYLES; do
    $VLM classify "$S/images" --method cbd -d "$OUT/desc-$style.jsonl" --text-store "$S/text-$style" \
      --explain-true -o "$S/$style.jsonl" "${spec[@]}" --device "$DEVICE"
  done
  # 5. evaluate, and test whether CBD's gain over CLIP is real
  for run in clip-bare clip-photo $STYLES; do
    $VLM -q eval "$S/$run.jsonl" -o "$S/$run.eval.jsonl" --csv "$S/$run.per_class.csv"
  done
  $VLM eval compare "$S/clip-bare.jsonl" "$S/cbd.jsonl" --names CLIP,CBD -o "$S/compare-clip-cbd.jsonl" --show 0
done

# 6. the table: ours beside the study's (and WaffleCLIP's published B/32 figures)
python3 - "$OUT" $MODELS <<'EOF'
import json, os, sys

out, models = sys.argv[1], sys.argv[2:]
runs = [("clip-bare", "CLIP"), ("clip-photo", "CLIP photo"), ("cbd", "CBD"), ("domain", "domain ex."),
        ("background", "domain+bg"), ("waffle", "Waffle")]
# The study's figures (CUB test, top-1 / top-5): CLIP, CBD, domain examples only, domain + background.
study = {
    "ViT-B-32": {"clip-bare": (52.00, 82.59), "cbd": (53.14, 84.17), "domain": (53.57, 84.24), "background": (54.04, 84.35)},
    "ViT-B-16": {"clip-bare": (56.42, 84.85), "cbd": (57.77, 87.33), "domain": (58.46, 87.66), "background": (58.78, 87.45)},
    "ViT-L-14": {"clip-bare": (63.07, 90.44), "cbd": (64.69, 92.01), "domain": (64.60, 92.22), "background": (65.22, 92.44)},
    "ViT-L-14-336": {"clip-bare": (63.29, 90.42), "cbd": (65.40, 92.10), "domain": (65.65, 91.96), "background": (66.10, 92.39)},
}
waffle_csv = {"ViT-B-32": {"clip-bare": 51.28, "cbd": 52.47, "waffle": 52.39}}  # WaffleCLIP's published CSVs

def fmt(x):
    return "  -  " if x is None else f"{x:5.2f}"

for metric, pos in (("top-1", 0), ("top-5", 1)):
    print(f"\n{metric} accuracy (%), CUB-200-2011 test, ours/study's:")
    print(f"{'model':<14}" + "".join(f"{name:>13}" for _, name in runs))
    for m in models:
        cells = []
        for run, _ in runs:
            path = os.path.join(out, m, f"{run}.eval.jsonl")
            ours = None
            if os.path.exists(path):
                v = json.loads(open(path).readline())["acc1" if pos == 0 else "acc5"]
                ours = None if v is None else 100 * v
            ref = study.get(m, {}).get(run)
            cells.append(f"{fmt(ours)}/{fmt(ref[pos] if ref else None)}")
        print(f"{m:<14}" + "".join(f"{c:>13}" for c in cells))
print("\nWaffleCLIP's published CSVs, top-1: " + "; ".join(
    f"{m}: CLIP {r['clip-bare']:.2f}, CBD {r['cbd']:.2f}, Waffle {r['waffle']:.2f}" for m, r in waffle_csv.items()))
for m in models:
    path = os.path.join(out, m, "compare-clip-cbd.jsonl")
    if os.path.exists(path):
        c = json.loads(open(path).readline())
        print(f"{m}: CBD - CLIP = {100 * c['difference']:+.2f} points, McNemar exact p = {c['mcnemar']['p_exact']:.3g}")
EOF
