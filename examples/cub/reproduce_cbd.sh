#!/usr/bin/env bash
# Reproduce study 000 on CUB-200-2011 (test split, 5,794 images, 200 classes): Menon & Vondrick's
# classification by description (CBD) vs plain CLIP, with the descriptors the published numbers came
# from (Menon's released descriptors_cub.json) and regenerated ones, the study's two prompt improvements
# (its Sooty Albatross exemplar without and with the habitat bullet, shipped as `--exemplars cub`), and
# the WaffleCLIP random-descriptor control averaged over draws, for four CLIP sizes. Ends with one table:
# ours, the study's, and the difference, per row (also written as OUT/table.tsv).
#
#   examples/cub/reproduce_cbd.sh /data/CUB_200_2011 [OUT_DIR]
#
# Needs network access (open_clip weights, Menon's descriptors, the LLM) or all three already there.
# A GPU makes it practical (four CLIP sizes x 5,794 images; fp16 on CPU is slow). Environment:
#   MODELS          open_clip models                  [ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336]
#   PRETRAINED      pretrained tag                    [openai]
#   DEVICE          auto | cpu | cuda:N               [auto]
#   PRECISION       fp32 | fp16 | bf16 | amp          [fp16: Menon ran OpenAI CLIP's fp16 weights]
#   DTYPE           stored embeddings                 [float32]
#   LLM_MODEL       model for the regenerated rows    [gpt-4o-mini]; OPENAI_API_KEY, OPENAI_BASE_URL as usual
#   LLM_API         chat | completions                [chat; the study used GPT-3 completions: try
#                   LLM_API=completions LLM_MODEL=gpt-3.5-turbo-instruct]
#   DRAWS           WaffleCLIP draws to average       [8; WaffleCLIP asks for more than 7]
#   CBD_DESCRIPTORS Menon's descriptors_cub.json, a local file or a URL
#                   [https://raw.githubusercontent.com/sachit-menon/classify_by_description_release/main/descriptors/descriptors_cub.json]
#   SKIP_LLM        1: skip the rows that need an LLM (regenerated, exemplar, exemplar + habitat)
#   VLMTOOLS        the vlmtools command              [vlmtools]
# Every step resumes: rerunning skips finished stores and descriptor classes already written.
set -euo pipefail

ROOT=${1:?usage: $0 CUB_200_2011_ROOT [OUT_DIR]}
OUT=${2:-cbd-repro}
MODELS=${MODELS:-"ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336"}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
PRECISION=${PRECISION:-fp16}
DTYPE=${DTYPE:-float32}
LLM_MODEL=${LLM_MODEL:-gpt-4o-mini}
LLM_API=${LLM_API:-chat}
DRAWS=${DRAWS:-8}
CBD_DESCRIPTORS=${CBD_DESCRIPTORS:-https://raw.githubusercontent.com/sachit-menon/classify_by_description_release/main/descriptors/descriptors_cub.json}
SKIP_LLM=${SKIP_LLM:-0}
VLM=${VLMTOOLS:-vlmtools}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"

# 1. data: the test split, with the CBD paper's class names ("Black-footed Albatross")
[ -s "$OUT/test.jsonl" ] || $VLM data cub "$ROOT" --only test -o "$OUT/test.jsonl"

# 2. descriptors
#    released: Menon & Vondrick's descriptors_cub.json, the descriptors behind the published CBD numbers
if [ ! -s "$OUT/descriptors_cub.json" ]; then
  case "$CBD_DESCRIPTORS" in
    http://*|https://*) python3 -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
                          "$CBD_DESCRIPTORS" "$OUT/descriptors_cub.json.part" && mv "$OUT/descriptors_cub.json.part" "$OUT/descriptors_cub.json" ;;
    *) cp "$CBD_DESCRIPTORS" "$OUT/descriptors_cub.json" ;;
  esac
fi
$VLM descriptors import "$OUT/descriptors_cub.json" -o "$OUT/desc-released.jsonl"
STYLES="released"
if [ "$SKIP_LLM" != 1 ]; then
  #  cbd: Menon's prompt (lemur and television), regenerated with LLM_MODEL
  #  domain: study 000's improvement 1, its Sooty Albatross exemplar (six bullets) in place of the lemur
  #  background: improvement 2, the same exemplar plus its habitat bullet
  llm=(--model "$LLM_MODEL" --api "$LLM_API")
  $VLM describe "$OUT/test.jsonl" --style cbd "${llm[@]}" -o "$OUT/desc-cbd.jsonl"
  $VLM describe "$OUT/test.jsonl" --style domain --exemplars cub "${llm[@]}" -o "$OUT/desc-domain.jsonl"
  $VLM describe "$OUT/test.jsonl" --style background --exemplars cub "${llm[@]}" -o "$OUT/desc-background.jsonl"
  STYLES="released cbd domain background"
fi
#    waffle: WaffleCLIP's random words and characters (characters from the released descriptors, as theirs),
#    one shared set per draw, no LLM
$VLM describe "$OUT/test.jsonl" --style waffle --waffle-chars "$OUT/desc-released.jsonl" --draws "$DRAWS" \
  --seed 0 -o "$OUT/waffle"

for M in $MODELS; do
  S="$OUT/$M"
  spec=(--model "$M" --pretrained "$PRETRAINED" --device "$DEVICE" --precision "$PRECISION")
  # 3. embed images once per model, descriptors once per model and set
  $VLM embed images "$OUT/test.jsonl" -o "$S/images" "${spec[@]}" --dtype "$DTYPE"
  for style in $STYLES; do
    $VLM embed text "$OUT/desc-$style.jsonl" -o "$S/text-$style" "${spec[@]}" --dtype "$DTYPE"
  done
  # 4. classify: CLIP with the bare class name (the CBD paper's baseline), "a photo of a {}." and CLIP's
  #    bird prompt; CBD per descriptor set (a class without descriptors is scored as Menon does);
  #    WaffleCLIP's draws in its own sentence form ("A photo of a {c}, which has {d}.")
  for t in bare photo birds; do
    $VLM classify "$S/images" --method clip --templates "$t" -o "$S/clip-$t.jsonl" "${spec[@]}"
  done
  for style in $STYLES; do
    $VLM classify "$S/images" --method cbd -d "$OUT/desc-$style.jsonl" --text-store "$S/text-$style" \
      --classes "$OUT/test.jsonl" --allow-empty --explain-true -o "$S/$style.jsonl" "${spec[@]}"
  done
  for ((i = 0; i < DRAWS; i++)); do
    $VLM classify "$S/images" --method cbd -d "$OUT/waffle/draw-$i.jsonl" --wrap waffle --no-explain \
      --classes "$OUT/test.jsonl" -o "$S/waffle-$i.jsonl" "${spec[@]}"
  done
  # 5. evaluate, and test whether CBD's gain over CLIP is real
  runs="clip-bare clip-photo clip-birds $STYLES"
  for ((i = 0; i < DRAWS; i++)); do runs="$runs waffle-$i"; done
  for run in $runs; do
    $VLM -q eval "$S/$run.jsonl" -o "$S/$run.eval.jsonl" --csv "$S/$run.per_class.csv"
  done
  $VLM eval compare "$S/clip-bare.jsonl" "$S/released.jsonl" --names CLIP,CBD -o "$S/compare-clip-cbd.jsonl" --show 0
done

# 6. ours beside the study's. The study's figures (slides 000, CUB test, top-1 / top-5 %): CLIP, CBD
#    ("CBDの再現値"), exemplar only ("凡例のみ変えた場合", supplementary table), exemplar + habitat ("提案手法").
#    WaffleCLIP's own CSV gives ViT-B/32 only.
python3 - "$OUT" "$LLM_MODEL" "$DRAWS" "$STYLES" $MODELS > "$OUT/rows.tsv" <<'PY'
import sys

out, llm, draws, styles, models = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), sys.argv[5:]
study = {  # model: {row: (top-1, top-5)}
    "ViT-B-32": {"clip": (52.00, 82.59), "cbd": (53.14, 84.17), "domain": (53.57, 84.24), "background": (54.04, 84.35)},
    "ViT-B-16": {"clip": (56.42, 84.85), "cbd": (57.77, 87.33), "domain": (58.46, 87.66), "background": (58.78, 87.45)},
    "ViT-L-14": {"clip": (63.07, 90.44), "cbd": (64.69, 92.01), "domain": (64.60, 92.22), "background": (65.22, 92.44)},
    "ViT-L-14-336": {"clip": (63.29, 90.42), "cbd": (65.40, 92.10), "domain": (65.65, 91.96), "background": (66.10, 92.39)},
}
waffle = {"ViT-B-32": (52.39, None)}  # WaffleCLIP's results/waffleclip.csv, CUB, top-1
rows = [("clip-bare", "CLIP (class name)", "clip"), ("clip-photo", 'CLIP "a photo of a {}."', None),
        ("clip-birds", 'CLIP "..., a type of bird."', None), ("released", "CBD (released descriptors)", "cbd"),
        ("cbd", f"CBD (regenerated with {llm})", "cbd"), ("domain", "exemplar only (--exemplars cub)", "domain"),
        ("background", "exemplar + habitat (--exemplars cub)", "background")]
print("# table\tmodel\trow\tmetric\tstudy\tresults")
for pos, metric in enumerate(("acc1", "acc5")):
    for m in models:
        for run, label, key in rows:
            if run.startswith("clip") or run in styles:
                ref = study.get(m, {}).get(key) if key else None
                print(f"CUB test\t{m}\t{label}\t{metric}\t{'-' if ref is None else ref[pos]}\t{out}/{m}/{run}.eval.jsonl")
        ref = waffle.get(m, (None, None))[pos]
        files = ",".join(f"{out}/{m}/waffle-{i}.eval.jsonl" for i in range(draws))
        print(f"CUB test\t{m}\tWaffleCLIP ({draws} draws)\t{metric}\t{'-' if ref is None else ref}\t{files}")
PY
python3 "$HERE/../compare.py" "$OUT/rows.tsv" -o "$OUT/table.tsv"
python3 - "$OUT" $MODELS <<'PY'
import json, sys

for m in sys.argv[2:]:
    c = json.loads(open(f"{sys.argv[1]}/{m}/compare-clip-cbd.jsonl").readline())
    print(f"{m}: CBD (released) - CLIP = {100 * c['difference']:+.2f} points, "
          f"McNemar exact p = {c['mcnemar']['p_exact']:.3g}")
PY
