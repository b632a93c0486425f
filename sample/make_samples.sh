#!/usr/bin/env bash
# Regenerate the sample GIFs and timelines in sample/ with our pipeline (demo.py, own-video path)
# on seeded synthetic data. Offline, CPU, about a minute.
#
#   bash sample/make_samples.sh                                          # random-weight network (default)
#   CKPT=weights/ours.pth BACKBONE=imagenet bash sample/make_samples.sh  # a trained checkpoint
#
# CKPT: checkpoint to segment with (default: a random-weight G-FRTM made here, seed 0: the
# masks after the first frame are meaningless). BACKBONE: --backbone-weights (default random;
# use imagenet or a path with a trained checkpoint). WORK: scratch folder (default a temp dir).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
WORK="${WORK:-$(mktemp -d)}"
BACKBONE="${BACKBONE:-random}"
mkdir -p "$WORK"

if [ -z "${CKPT:-}" ]; then
    CKPT="$WORK/random_gfrtm_rn18.pth"
    "$PY" -c "import sys, torch; from models.network import GFRTM; from models.checkpoint import save_checkpoint; torch.manual_seed(0); save_checkpoint(sys.argv[1], GFRTM('resnet18').eval())" "$CKPT"
fi

# segment NAME VIDEO MASK: demo.py's own-video path with the settings of the samples.
segment() {
    "$PY" demo.py --video "$2" --mask "$3" --model "$CKPT" --backbone-weights "$BACKBONE" --dev cpu --TH 0.7 \
        --num-aug 5 --seed 0 --fps-out 8 --out "$WORK/out/$1"
}

# DAVIS-like: 24 frames 120x216, two objects from the first frame (first-frame PNG as --mask).
"$PY" -m dataset.synthetic --out "$WORK/davis" --layout davis --seed 0 --sequences 1 --train-sequences 0 \
    --frames 24 --size 120x216 --objects 2
segment synth-davis "$WORK/davis/JPEGImages/480p/synth-val-00" "$WORK/davis/Annotations/480p/synth-val-00/00000.png"

# YouTube-VOS-like: 26 frames, object 2 enters later (mask folder: a PNG where each object starts).
"$PY" -m dataset.synthetic --out "$WORK/ytvos" --layout ytvos --seed 0 --sequences 1 --train-sequences 0 \
    --frames 26 --size 120x216 --objects 2
segment synth-ytvos "$WORK/ytvos/valid_all_frames/JPEGImages/synthva000" "$WORK/ytvos/valid/Annotations/synthva000"

cp "$WORK/out/synth-davis/overlay.gif" sample/synth_davis.gif
cp "$WORK/out/synth-davis/timeline.png" sample/synth_davis_timeline.png
cp "$WORK/out/synth-ytvos/overlay.gif" sample/synth_ytvos_late_object.gif
cp "$WORK/out/synth-ytvos/timeline.png" sample/synth_ytvos_late_object_timeline.png
ls -l sample/
echo "scratch outputs in $WORK"
