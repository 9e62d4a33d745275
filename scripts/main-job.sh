#!/usr/bin/env bash
# The main job: MobileNet v2, ImageNet features frozen, new head, on the full Kermany data
# (20 epochs, batch 64, paper augmentation). Extra arguments go to `medxfer train`.
set -euo pipefail
cd "$(dirname "$0")/.."
data=${MEDXFER_DATA:-../shared/data/chest_xray}
weights=../shared/weights/mobilenet_v2-b0353104.pth
# Offline machines: put the ImageNet file where torchvision's weight enum looks for it.
[ -f "$weights" ] && .venv/bin/medxfer weights "$weights"
.venv/bin/medxfer train --data "$data" --out runs/mobilenet_v2-transfer "$@"
