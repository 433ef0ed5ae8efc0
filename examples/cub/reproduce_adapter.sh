#!/usr/bin/env bash
# Reproduce study 001 on CUB-200-2011: an adapter (one FC layer on CLIP image features) trained on a mix of
# real image embeddings and text embeddings used as images, for image shares 100% .. 0% of the training
# slots, class-balanced (the study's fix) and global (Hirano's earlier protocol); texts are Reed et al.'s
# human captions or the LLM's structured class descriptions, translated into the image space by a
# Q-Former trained on MS COCO captions. Ends with one table, CUB test top-1 per ratio: ours, the study's,
# the difference (OUT/table.tsv, OUT/table.txt); the Q-Former's COCO val recall is printed before it.
#
#   examples/cub/reproduce_adapter.sh CUB_200_2011_ROOT REED_TEXT_C10_DIR COCO_ROOT [OUT_DIR]
#
# Inputs (none ships with vlmtools):
#   CUB_200_2011_ROOT  CUB-200-2011 (the CUB_200_2011 directory or the folder holding it)
#   REED_TEXT_C10_DIR  Reed et al.'s cvpr2016_cub captions: text_c10/<class>/<image name>.txt, ten per image
#   COCO_ROOT          MS COCO 2017: train2017/ and annotations/captions_train2017.json
# and the open_clip weights (network once, then the Hugging Face cache), an OpenAI-compatible LLM
# (OPENAI_API_KEY, or OPENAI_BASE_URL of a local server). Environment:
#   MODEL, PRETRAINED  the CLIP                       [ViT-L-14 / openai]
#   DEVICE             auto | cpu | cuda:N            [auto]
#   LLM_MODEL          model for describe             [gpt-3.5-turbo, as the study]
#   COCO_LIMIT         COCO images for the Q-Former   [0 = all 118,287]
#   T2I_ARCH           qformer | mlp                  [qformer, as the study]
#   T2I_EPOCHS         most epochs of the translator  [100]
#   EPOCHS             most epochs of each adapter    [100]
#   RATIOS             image shares swept             [1.0,0.9,...,0.0: the study's eleven]
#   SEED               seed of every head and draw    [0]
#   VLMTOOLS           the vlmtools command           [vlmtools]
#   BATCH              1: the model's commands in one vlmtools process; 0: one process per command  [1]
# Every embed step resumes and a trained translator is kept; the sweeps retrain (2 heads per ratio).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"

if [ $# -lt 3 ] || [ $# -gt 4 ]; then
  die "usage: $SCRIPT CUB_200_2011_ROOT REED_TEXT_C10_DIR COCO_ROOT [OUT_DIR]"
fi
CUB=$1
REED=$2
COCO=$3
OUT=${4:-adapter-repro}
MODEL=${MODEL:-ViT-L-14}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
LLM_MODEL=${LLM_MODEL:-gpt-3.5-turbo}
COCO_LIMIT=${COCO_LIMIT:-0}
T2I_ARCH=${T2I_ARCH:-qformer}
T2I_EPOCHS=${T2I_EPOCHS:-100}
EPOCHS=${EPOCHS:-100}
RATIOS=${RATIOS:-1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0.0}
SEED=${SEED:-0}
need_dir "$CUB" "CUB_200_2011_ROOT"
need_dir "$REED" "REED_TEXT_C10_DIR"
need_dir "$COCO" "COCO_ROOT"
mkdir -p "$OUT"
spec=(--model "$MODEL" --pretrained "$PRETRAINED" --device "$DEVICE")

step "1. CUB's manifest; Reed's and COCO's captions as {\"id\", \"image_id\", \"text\"} JSONL"
batch data
if [ ! -s "$OUT/cub.jsonl" ]; then vlm data cub "$CUB" -o "$OUT/cub.jsonl"; fi
run_batch
"$PYTHON" - "$OUT" "$REED" "$COCO" "$COCO_LIMIT" <<'PY'
import json, os, sys

out, reed, coco, limit = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])


def fail(message):
    sys.exit(f"error: {message}")


def write_atomic(path, lines):
    with open(path + ".tmp", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(rec) + "\n" for rec in lines)
    os.replace(path + ".tmp", path)


if not os.path.exists(f"{out}/reed.jsonl"):  # ten captions per image, keyed by the manifest's image id
    rows = []
    for rec in map(json.loads, open(f"{out}/cub.jsonl", encoding="utf-8")):
        image = rec["path"]
        caps = os.path.join(reed, os.path.basename(os.path.dirname(image)),
                            os.path.splitext(os.path.basename(image))[0] + ".txt")
        if not os.path.isfile(caps):
            fail(f"{caps}: no captions for CUB image {rec['id']} (REED_TEXT_C10_DIR is the text_c10 folder: "
                 f"<class>/<image name>.txt)")
        texts = [t.strip() for t in open(caps, encoding="utf-8") if t.strip()]
        rows += [{"id": f"{rec['id']}:{k}", "image_id": rec["id"], "text": t} for k, t in enumerate(texts)]
    write_atomic(f"{out}/reed.jsonl", rows)
if not os.path.exists(f"{out}/coco-captions.jsonl"):  # COCO 2017 train: its images and their captions
    path = f"{coco}/annotations/captions_train2017.json"
    if not os.path.isfile(path):
        fail(f"{path}: missing (COCO_ROOT holds annotations/captions_train2017.json and train2017/)")
    ann = json.load(open(path, encoding="utf-8"))
    images = sorted(ann["images"], key=lambda im: im["id"])[:limit or None]
    keep = {im["id"] for im in images}
    write_atomic(f"{out}/coco-images.jsonl",
                 [{"id": str(im["id"]), "path": f"{coco}/train2017/{im['file_name']}"} for im in images])
    write_atomic(f"{out}/coco-captions.jsonl",
                 [{"id": str(a["id"]), "image_id": str(a["image_id"]), "text": a["caption"].strip()}
                  for a in ann["annotations"] if a["image_id"] in keep])
PY

step "2. class descriptions from the LLM ($LLM_MODEL): the study's structured fields, one sample per field"
batch "$MODEL"
vlm describe "$OUT/cub.jsonl" --style structured --llm "$LLM_MODEL" -o "$OUT/gpt.jsonl"

step "3. embeddings"
vlm embed images "$OUT/cub.jsonl" -o "$OUT/cub-images" "${spec[@]}"
vlm embed images "$OUT/coco-images.jsonl" -o "$OUT/coco-images" "${spec[@]}"
vlm embed text "$OUT/coco-captions.jsonl" -o "$OUT/coco-text" "${spec[@]}"
vlm embed text "$OUT/reed.jsonl" -o "$OUT/reed-text" "${spec[@]}"
vlm embed text "$OUT/gpt.jsonl" --wrap none -o "$OUT/gpt-text" "${spec[@]}"

step "4. the text -> image translator ($T2I_ARCH) on COCO's captions (its token features computed per batch)"
if [ ! -s "$OUT/t2i.json" ]; then
  vlm train t2i "$OUT/coco-text" --images "$OUT/coco-images" --arch "$T2I_ARCH" --epochs "$T2I_EPOCHS" \
    --seed "$SEED" -o "$OUT/t2i" --device "$DEVICE" --json '>' "$OUT/t2i.summary.json"
fi

step "5. the sweeps: CUB test top-1 per image share"
common=(--where split=train --test-where split=test --sweep "$RATIOS" --t2i "$OUT/t2i" --epochs "$EPOCHS"
        --seed "$SEED" --device "$DEVICE" --json)
vlm train adapter "$OUT/cub-images" --text "$OUT/reed-text" "${common[@]}" --plots "$OUT/plots-reed" \
  '>' "$OUT/sweep-reed.jsonl"
vlm train adapter "$OUT/cub-images" --text "$OUT/gpt-text" "${common[@]}" --plots "$OUT/plots-gpt" \
  '>' "$OUT/sweep-gpt.jsonl"
vlm train adapter "$OUT/cub-images" --text "$OUT/reed-text" "${common[@]}" --balance global \
  '>' "$OUT/sweep-reed-global.jsonl"
run_batch

step "6. ours beside the study's"
"$PYTHON" - "$OUT" <<'PY' > "$OUT/ours.tsv"
import json, sys

out = sys.argv[1]
t2i = json.load(open(f"{out}/t2i.json")).get("retrieval")
if t2i:
    b, a = t2i["before"], t2i["after"]
    print(f"translator, COCO val text->image recall@1 {100 * b['r1']:.1f}% -> {100 * a['r1']:.1f}%, recall@5 "
          f"{100 * b['r5']:.1f}% -> {100 * a['r5']:.1f}% ({t2i['val_images']} images)", file=sys.stderr)
# (sweep, its key, the study's column): class-balanced image only / + Reed / + GPT; Hirano's global protocol
cells = [("sweep-reed", "image_only", "image only"), ("sweep-reed-global", "image_only", "image only (Hirano)"),
         ("sweep-reed", "image_text", "+ Reed"), ("sweep-reed-global", "image_text", "+ Reed (Hirano)"),
         ("sweep-gpt", "image_text", "+ gpt-3.5-turbo")]
print("table\trow\tcolumn\tvalue")
for sweep, key, column in cells:
    for r in map(json.loads, open(f"{out}/{sweep}.jsonl")):
        share = round(100 * r["image_ratio"])
        if r.get(key) is not None and share != (0 if key == "image_only" else 100):  # the study's "—" cells
            print(f"top-1\t({share}, {100 - share})\t{column}\t{100 * r[key]:.4f}")
PY
compare_table "$HERE/study_001.tsv" "$OUT/ours.tsv" "study 001: CUB test top-1 (%) by (image, text) share, ours beside the study's"
