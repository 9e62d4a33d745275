#!/usr/bin/env bash
# The README's two pictures, from the transfer runs of the segmentation and detection presets:
#   medxfer study run segmentation --out studies/out/segmentation
#   medxfer study run detection --out studies/out/detection
# A predicted lung mask on a Montgomery County test X-ray (a public NLM release) and predicted
# blood-cell boxes on a BCCD test image (MIT licence); neither image was seen in training.
set -euo pipefail
cd "$(dirname "$0")/.."
MEDXFER=${MEDXFER:-.venv/bin/medxfer}
SEG=${SEG:-studies/out/segmentation/runs/mobilenet_v2-transfer-s0}
DET=${DET:-studies/out/detection/runs/mobilenet_v2-transfer-s0}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$MEDXFER" segment predict "$SEG" ../shared/data/lung_seg/images/MCUCXR_0006_0.png --out "$tmp/seg"
"$MEDXFER" detect predict "$DET" ../shared/data/bccd/BCCD/JPEGImages/BloodImage_00007.jpg \
    --out "$tmp/det"
mkdir -p docs/images
cp "$tmp/seg/MCUCXR_0006_0_overlay.png" docs/images/lung-mask-overlay.png
cp "$tmp/det/BloodImage_00007_boxes.png" docs/images/bccd-boxes.png
echo "wrote docs/images/lung-mask-overlay.png and docs/images/bccd-boxes.png"
