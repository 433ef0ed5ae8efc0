#!/usr/bin/env bash
# Reproduce study 000 on CUB-200-2011 (test split, 5,794 images, 200 classes): Menon & Vondrick's
# classification by description (CBD) vs plain CLIP, with the descriptors the published numbers came from
# (Menon's released descriptors_cub.json) and regenerated ones, the study's two prompt improvements (its
# Sooty Albatross exemplar without and with the habitat bullet, shipped as `--exemplars cub`), and the
# WaffleCLIP random-descriptor control averaged over draws, for four CLIP sizes. Ends with one table, top-1
# and top-5: ours, the study's, the difference (OUT/table.tsv, OUT/table.txt), and McNemar's test of CBD
# against CLIP per model.
#
#   examples/cub/reproduce_cbd.sh CUB_200_2011_ROOT [OUT_DIR]
#
# Inputs: CUB-200-2011 (the CUB_200_2011 directory or the folder holding it); the open_clip weights
# (network once, then the Hugging Face cache); Menon's descriptors_cub.json (downloaded, or a local file;
# offline, its rows are skipped with a message); an OpenAI-compatible LLM for the regenerated and exemplar
# rows (OPENAI_API_KEY, or OPENAI_BASE_URL of a local server; SKIP_LLM=1 leaves those rows out).
# Environment:
#   MODELS          open_clip models, each NAME or NAME=STUDY_ROW (the study's row it is compared with;
#                   the four below map to theirs)   [ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336]
#   PRETRAINED      pretrained tag                  [openai]
#   DEVICE          auto | cpu | cuda:N             [auto]
#   PRECISION       fp32 | fp16 | bf16 | amp        [fp16: Menon ran OpenAI CLIP's half weights]
#   DTYPE           stored embeddings               [float32]
#   LLM_MODEL       model for the LLM rows          [gpt-4o-mini]
#   LLM_API         chat | completions              [chat; the study used GPT-3 completions: try
#                   LLM_API=completions LLM_MODEL=gpt-3.5-turbo-instruct]
#   SKIP_LLM        1: leave out the rows that need an LLM (regenerated, exemplar, exemplar + habitat)
#   DRAWS           WaffleCLIP draws to average     [8; WaffleCLIP asks for more than 7]
#   CBD_DESCRIPTORS Menon's descriptors_cub.json, a local file or a URL
#                   [https://raw.githubusercontent.com/sachit-menon/classify_by_description_release/main/descriptors/descriptors_cub.json]
#   VLMTOOLS        the vlmtools command            [vlmtools]
#   BATCH           1: each model's commands in one vlmtools process; 0: one process per command  [1]
# Every step resumes: rerunning skips finished stores and descriptor classes already written.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

if [ $# -lt 1 ] || [ $# -gt 2 ]; then die "usage: $SCRIPT CUB_200_2011_ROOT [OUT_DIR]"; fi
ROOT=$1
OUT=${2:-cbd-repro}
MODELS=${MODELS-"ViT-B-32 ViT-B-16 ViT-L-14 ViT-L-14-336"}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
PRECISION=${PRECISION:-fp16}
DTYPE=${DTYPE:-float32}
LLM_MODEL=${LLM_MODEL:-gpt-4o-mini}
LLM_API=${LLM_API:-chat}
SKIP_LLM=${SKIP_LLM:-0}
DRAWS=${DRAWS:-8}
CBD_DESCRIPTORS=${CBD_DESCRIPTORS:-https://raw.githubusercontent.com/sachit-menon/classify_by_description_release/main/descriptors/descriptors_cub.json}
need_dir "$ROOT" "CUB_200_2011_ROOT"
mkdir -p "$OUT"

step "1. the test split (CBD's class names, \"Black-footed Albatross\")"
batch data
if [ ! -s "$OUT/test.jsonl" ]; then vlm data cub "$ROOT" --only test -o "$OUT/test.jsonl"; fi
run_batch

step "2. Menon & Vondrick's released descriptors (the published CBD numbers)"
STYLES=""
if [ ! -s "$OUT/descriptors_cub.json" ]; then
  case "$CBD_DESCRIPTORS" in
    http://*|https://*)
      if "$PYTHON" - "$CBD_DESCRIPTORS" "$OUT/descriptors_cub.json" <<'PY'; then
import json, os, sys, urllib.request

url, out = sys.argv[1], sys.argv[2]
try:
    with urllib.request.urlopen(url, timeout=30) as response:
        data = response.read()
    json.loads(data)
except Exception as exc:  # offline, HTTP error, not JSON: say which, in one line
    sys.exit(f"cannot download {url}: {type(exc).__name__}: {exc}")
with open(out + ".part", "wb") as fh:
    fh.write(data)
os.replace(out + ".part", out)
PY
        say "downloaded $CBD_DESCRIPTORS"
      else
        skip "the rows with Menon's released descriptors (CBD): the download failed (above); set" \
             "CBD_DESCRIPTORS=FILE to a local descriptors_cub.json to include them"
      fi ;;
    *)
      if [ ! -f "$CBD_DESCRIPTORS" ]; then die "CBD_DESCRIPTORS=$CBD_DESCRIPTORS: no such file"; fi
      cp "$CBD_DESCRIPTORS" "$OUT/descriptors_cub.json" ;;
  esac
fi
batch descriptors
if [ -s "$OUT/descriptors_cub.json" ]; then
  vlm descriptors import "$OUT/descriptors_cub.json" -o "$OUT/desc-released.jsonl"
  STYLES="released"
fi

step "3. descriptors from the LLM ($LLM_MODEL) and WaffleCLIP's random ones"
if [ "$SKIP_LLM" = 1 ]; then
  skip "the regenerated, exemplar and exemplar + habitat rows (SKIP_LLM=1)"
else
  #  cbd: Menon's prompt (lemur and television); domain: study 000's improvement 1, its Sooty Albatross
  #  exemplar in place of the lemur; background: improvement 2, the same exemplar plus its habitat bullet
  llm=(--llm "$LLM_MODEL" --api "$LLM_API")
  vlm describe "$OUT/test.jsonl" --style cbd "${llm[@]}" -o "$OUT/desc-cbd.jsonl"
  vlm describe "$OUT/test.jsonl" --style domain --exemplars cub "${llm[@]}" -o "$OUT/desc-domain.jsonl"
  vlm describe "$OUT/test.jsonl" --style background --exemplars cub "${llm[@]}" -o "$OUT/desc-background.jsonl"
  STYLES="$STYLES cbd domain background"
fi
#    waffle: WaffleCLIP's random words and characters, the characters drawn from descriptors' own (Menon's
#    released ones, as WaffleCLIP did, else the regenerated ones), one shared set per draw
CHARS=""
for style in cbd released; do
  case " $STYLES " in *" $style "*) CHARS="$OUT/desc-$style.jsonl" ;; esac
done
if [ -z "$CHARS" ]; then
  DRAWS=0
  skip "the WaffleCLIP rows: they draw their characters from descriptors, and there are none (no released file, SKIP_LLM=1)"
elif [ "$DRAWS" = 1 ]; then  # one draw is one file
  mkdir -p "$OUT/waffle"
  vlm describe "$OUT/test.jsonl" --style waffle --waffle-chars "$CHARS" --seed 0 -o "$OUT/waffle/draw-0.jsonl"
elif [ "$DRAWS" -gt 1 ]; then
  vlm describe "$OUT/test.jsonl" --style waffle --waffle-chars "$CHARS" --draws "$DRAWS" --seed 0 -o "$OUT/waffle"
fi
run_batch

step "4. per model: embed, classify, evaluate"
if [ -z "$MODELS" ]; then skip "every model (MODELS is empty): the table has the study's figures only"; fi
for entry in $MODELS; do
  M=${entry%%=*}
  S="$OUT/$M"
  spec=(--model "$M" --pretrained "$PRETRAINED" --device "$DEVICE" --precision "$PRECISION")
  batch "$M"
  # images once per model, descriptors once per model and set
  vlm embed images "$OUT/test.jsonl" -o "$S/images" "${spec[@]}" --dtype "$DTYPE"
  for style in $STYLES; do
    vlm embed text "$OUT/desc-$style.jsonl" -o "$S/text-$style" "${spec[@]}" --dtype "$DTYPE"
  done
  # CLIP with the bare class name (the CBD paper's baseline), "a photo of a {}." and CLIP's bird prompt;
  # CBD per descriptor set (a class without descriptors scored as Menon does); WaffleCLIP's draws in its
  # own sentence form ("A photo of a {c}, which has {d}.")
  for t in bare photo birds; do
    vlm classify "$S/images" --method clip --templates "$t" -o "$S/clip-$t.jsonl" "${spec[@]}"
  done
  for style in $STYLES; do
    vlm classify "$S/images" --method cbd -d "$OUT/desc-$style.jsonl" --text-store "$S/text-$style" \
      --classes "$OUT/test.jsonl" --allow-empty --explain-true -o "$S/$style.jsonl" "${spec[@]}"
  done
  for ((i = 0; i < DRAWS; i++)); do
    vlm classify "$S/images" --method cbd -d "$OUT/waffle/draw-$i.jsonl" --wrap waffle --no-explain \
      --classes "$OUT/test.jsonl" -o "$S/waffle-$i.jsonl" "${spec[@]}"
  done
  runs="clip-bare clip-photo clip-birds $STYLES"
  for ((i = 0; i < DRAWS; i++)); do runs="$runs waffle-$i"; done
  for run in $runs; do
    vlm -q eval "$S/$run.jsonl" -o "$S/$run.eval.jsonl" --csv "$S/$run.per_class.csv"
  done
  # is CBD's gain over CLIP real? McNemar's test on the same images
  for style in $STYLES; do
    if [ "$style" = released ] || [ "$style" = cbd ]; then
      vlm eval compare "$S/clip-bare.jsonl" "$S/$style.jsonl" --names "CLIP,CBD ($style)" \
        -o "$S/compare-clip-$style.jsonl" --show 0
    fi
  done
  run_batch
done

step "5. ours beside the study's"
"$PYTHON" - "$OUT" "$LLM_MODEL" "$DRAWS" "$STYLES" $MODELS > "$OUT/ours.tsv" <<'PY'
import json, os, sys

out, llm, draws, styles, models = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4].split(), sys.argv[5:]
study_rows = {"ViT-B-32": "ViT-B/32", "ViT-B-16": "ViT-B/16", "ViT-L-14": "ViT-L/14", "ViT-L-14-336": "ViT-L/14@336px"}
columns = [("clip-bare", "CLIP"), ("released", "CBD"), ("domain", "exemplar only"),
           ("background", "exemplar + habitat"), ("clip-photo", 'CLIP "a photo of a {}."'),
           ("clip-birds", 'CLIP "a photo of a {}, a type of bird."'), ("cbd", f"CBD (regenerated, {llm})")]
columns += [(f"waffle-{i}", f"WaffleCLIP ({draws} draws)") for i in range(draws)]
print("table\trow\tcolumn\tvalue")
for entry in models:
    model, _, row = entry.partition("=")
    row = row or study_rows.get(model, model)
    for metric, table in (("acc1", "top-1"), ("acc5", "top-5")):
        for run, column in columns:
            if run.startswith(("clip", "waffle")) or run in styles:
                path = f"{out}/{model}/{run}.eval.jsonl"
                value = json.loads(open(path).readline())[metric]  # eval's summary row, a fraction
                print(f"{table}\t{row}\t{column}\t{100 * value:.4f}")
PY
compare_table "$HERE/study_000.tsv" "$OUT/ours.tsv" "study 000: CUB test, zero-shot accuracy (%), ours beside the study's"
"$PYTHON" - "$OUT" $MODELS <<'PY'
import glob, json, sys

for entry in sys.argv[2:]:
    model = entry.partition("=")[0]
    for path in sorted(glob.glob(f"{sys.argv[1]}/{model}/compare-clip-*.jsonl")):
        c = json.loads(open(path).readline())
        print(f"{model}: {c['b']['name']} - CLIP = {100 * c['difference']:+.2f} points, "
              f"McNemar exact p = {c['mcnemar']['p_exact']:.3g}")
PY
