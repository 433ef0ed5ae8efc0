#!/usr/bin/env bash
# Reproduce study 001 on CUB-200-2011: an adapter (one FC layer on CLIP image features) trained on a mix of
# real image embeddings and text embeddings used as images, for image ratios 100% .. 0%, class-balanced
# (the study's fix) and global (Hirano's earlier protocol); text = Reed et al.'s human captions or
# gpt-3.5-turbo class descriptions, both translated into the image space by a Q-Former trained on MS COCO
# captions. Prints our accuracies beside the study's.
#
#   examples/cub/reproduce_adapter.sh CUB_200_2011_ROOT REED_TEXT_C10_DIR COCO_ROOT [OUT_DIR]
#
# What to download (none of it ships with vlmtools; this script was NOT run in the project's offline
# sandbox, which has neither the data nor pretrained CLIP weights, so its output has never been checked
# against the study's numbers):
#   CUB_200_2011_ROOT  CUB-200-2011 (https://www.vision.caltech.edu/datasets/cub_200_2011/): images.txt,
#                      image_class_labels.txt, train_test_split.txt, classes.txt, images/
#   REED_TEXT_C10_DIR  Reed et al. 2016 "cvpr2016_cub" captions: text_c10/<class dir>/<image name>.txt,
#                      10 sentences per image (https://github.com/reedscot/cvpr2016)
#   COCO_ROOT          MS COCO 2017: train2017/ and annotations/captions_train2017.json (https://cocodataset.org)
# Needs network access (open_clip weights, the LLM) or both cached. Environment:
#   MODEL, PRETRAINED  the CLIP                     [ViT-L-14 / openai]
#   DEVICE             auto | cpu | cuda:N          [auto]
#   LLM_MODEL          model for describe           [gpt-3.5-turbo]; OPENAI_API_KEY, OPENAI_BASE_URL as usual
#   COCO_LIMIT         COCO images used for t2i     [0 = all 118,287]
#   T2I_ARCH           qformer | mlp                [qformer, as the study]
#   VLMTOOLS           the vlmtools command         [vlmtools]
# Every embed step resumes; the sweeps retrain (about 20 heads each, seconds per head on a GPU).
set -euo pipefail

CUB=${1:?usage: $0 CUB_200_2011_ROOT REED_TEXT_C10_DIR COCO_ROOT [OUT_DIR]}
REED=${2:?usage: $0 CUB_200_2011_ROOT REED_TEXT_C10_DIR COCO_ROOT [OUT_DIR]}
COCO=${3:?usage: $0 CUB_200_2011_ROOT REED_TEXT_C10_DIR COCO_ROOT [OUT_DIR]}
OUT=${4:-adapter-repro}
MODEL=${MODEL:-ViT-L-14}
PRETRAINED=${PRETRAINED:-openai}
DEVICE=${DEVICE:-auto}
LLM_MODEL=${LLM_MODEL:-gpt-3.5-turbo}
COCO_LIMIT=${COCO_LIMIT:-0}
T2I_ARCH=${T2I_ARCH:-qformer}
VLM=${VLMTOOLS:-vlmtools}
RATIOS=1.0,0.9,0.8,0.7,0.6,0.5,0.4,0.3,0.2,0.1,0.0
spec=(--model "$MODEL" --pretrained "$PRETRAINED" --device "$DEVICE")
mkdir -p "$OUT"

# 1. data: CUB train/test manifest; Reed captions and COCO captions as {"id", "image_id", "text"} JSONL
[ -s "$OUT/cub.jsonl" ] || $VLM data cub "$CUB" -o "$OUT/cub.jsonl"
python3 - "$CUB" "$REED" "$COCO" "$COCO_LIMIT" "$OUT" <<'PY'
import json, os, sys

cub, reed, coco, limit, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
if not os.path.exists(f"{out}/reed.jsonl"):
    with open(f"{cub}/images.txt") as fh, open(f"{out}/reed.jsonl.tmp", "w") as w:
        for line in fh:
            image_id, rel = line.split()
            path = os.path.join(reed, os.path.splitext(rel)[0] + ".txt")
            with open(path) as caps:
                for k, text in enumerate(t.strip() for t in caps if t.strip()):
                    w.write(json.dumps({"id": f"{image_id}:{k}", "image_id": image_id, "text": text}) + "\n")
    os.replace(f"{out}/reed.jsonl.tmp", f"{out}/reed.jsonl")
if not os.path.exists(f"{out}/coco-captions.jsonl"):
    ann = json.load(open(f"{coco}/annotations/captions_train2017.json"))
    images = sorted(ann["images"], key=lambda im: im["id"])[:limit or None]
    keep = {im["id"] for im in images}
    with open(f"{out}/coco-images.jsonl", "w") as w:
        for im in images:
            w.write(json.dumps({"id": str(im["id"]), "path": f"{coco}/train2017/{im['file_name']}"}) + "\n")
    with open(f"{out}/coco-captions.jsonl.tmp", "w") as w:
        for a in ann["annotations"]:
            if a["image_id"] in keep:
                w.write(json.dumps({"id": str(a["id"]), "image_id": str(a["image_id"]), "text": a["caption"].strip()}) + "\n")
    os.replace(f"{out}/coco-captions.jsonl.tmp", f"{out}/coco-captions.jsonl")
PY

# 2. class descriptions from the LLM, one text sample per sentence (study: gpt-3.5-turbo, structured fields)
$VLM describe "$OUT/cub.jsonl" --style structured --llm "$LLM_MODEL" -o "$OUT/gpt.jsonl"

# 3. embeddings
$VLM embed images "$OUT/cub.jsonl" -o "$OUT/cub-images" "${spec[@]}"
$VLM embed images "$OUT/coco-images.jsonl" -o "$OUT/coco-images" "${spec[@]}"
$VLM embed text "$OUT/coco-captions.jsonl" -o "$OUT/coco-text" "${spec[@]}"
$VLM embed text "$OUT/reed.jsonl" -o "$OUT/reed-text" "${spec[@]}"
$VLM embed text "$OUT/gpt.jsonl" --wrap none -o "$OUT/gpt-text" "${spec[@]}"

# 4. the text -> image translator on COCO captions (recall@1/5 before/after on its val images)
[ -s "$OUT/t2i.json" ] || $VLM train t2i "$OUT/coco-text" --images "$OUT/coco-images" --arch "$T2I_ARCH" \
  -o "$OUT/t2i" --device "$DEVICE" --json > "$OUT/t2i.summary.json"

# 5. the sweeps: accuracy on CUB's test split
common=(--where split=train --test-where split=test --sweep "$RATIOS" --t2i "$OUT/t2i" --device "$DEVICE" --json)
$VLM train adapter "$OUT/cub-images" --text "$OUT/reed-text" "${common[@]}" --plots "$OUT/plots-reed" > "$OUT/sweep-reed.jsonl"
$VLM train adapter "$OUT/cub-images" --text "$OUT/gpt-text" "${common[@]}" --plots "$OUT/plots-gpt" > "$OUT/sweep-gpt.jsonl"
$VLM train adapter "$OUT/cub-images" --text "$OUT/reed-text" "${common[@]}" --balance global > "$OUT/sweep-reed-global.jsonl"

# 6. the table: ours beside the study's (class-balanced; Hirano's global protocol in brackets)
python3 - "$OUT" <<'PY'
import json, sys

out = sys.argv[1]
def load(name):
    return {round(r["image_ratio"], 2): r for r in map(json.loads, open(f"{out}/{name}.jsonl"))}
reed, gpt, glob = load("sweep-reed"), load("sweep-gpt"), load("sweep-reed-global")
# study 001 (CUB test top-1 %): image only (Hirano's global protocol), + Reed captions (Hirano), + gpt-3.5
study = {1.0: ("85.07 (84.80)", "-", "-"), 0.9: ("85.26 (84.67)", "83.87 (85.05)", "84.05"),
         0.8: ("84.95 (83.55)", "83.13 (84.55)", "82.90"), 0.7: ("84.71 (82.55)", "81.57 (84.16)", "81.62"),
         0.6: ("84.48 (80.48)", "80.85 (83.33)", "80.01"), 0.5: ("84.23 (79.81)", "77.64 (82.52)", "78.68"),
         0.4: ("83.66 (77.82)", "76.10 (80.84)", "76.56"), 0.3: ("83.38 (73.33)", "72.05 (67.50)", "72.47"),
         0.2: ("82.83 (67.24)", "68.08 (61.25)", "67.24"), 0.1: ("81.88 (53.92)", "57.47 (49.12)", "57.96"),
         0.0: ("-", "24.12 (27.67)", "23.78")}
pct = lambda x: "-" if x is None else f"{100 * x:.2f}"
print("ratio (img,txt)\timage only: ours (global) | study (Hirano)\t+Reed: ours | study (Hirano)\t+GPT: ours | study")
for r in sorted(study, reverse=True):
    io = f"{pct(reed[r]['image_only'])} ({pct(glob[r]['image_only'])})"
    print(f"({round(100 * r)}, {round(100 - 100 * r)})\t{io} | {study[r][0]}\t{pct(reed[r]['image_text'])} | "
          f"{study[r][1]}\t{pct(gpt[r]['image_text'])} | {study[r][2]}")
PY
