#!/usr/bin/env bash
# Regenerate the sample GIFs and timelines in sample/ from the offline main job (demo.py without
# --video, = scripts/demo.sh): seeded synthetic data, brief CPU training with a random backbone,
# evaluation at TH 1.0 and 0.7; then the threshold sweep on the DAVIS sample (curve_davis_sample.png).
# Offline, CPU, a few minutes on 2 cores.
#
#   bash sample/make_samples.sh          # WORK: the main job's --work folder (default a temp dir)
#   WORK=demo_out/seeds/seed-0 bash sample/make_samples.sh   # reuses the main job's run there
#
# A WORK folder that holds a finished run of the main job (its report.json, e.g. the seed-0 run of
# `python -m benchmarks.main_job --seeds 0-9`, whose report docs/main-job.md shows) is used as it is.
#
# The GIFs are redrawn from the main job's TH 0.7 results with visualize.py at 160 px wide (the
# main job's own overlays are full size) to keep the repository small.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"

if [[ ! -f "$WORK/report.json" ]]; then
    "$PY" demo.py --work "$WORK" --dev cpu | tee "$WORK/main_job.txt"
fi
RESULTS="$(ls -d "$WORK"/result/ytvos-layout-demo_ep*_0.7_fast | tail -n 1)"
"$PY" visualize.py --results "$RESULTS" --frames "$WORK/synthetic-val/JPEGImages" \
    --out "$WORK/samples" --no-mp4 --gif-width 160

rm -f sample/main_job_*.gif sample/main_job_*_timeline.png
for seq in ytvos-own-0 ytvos-own-1 ytvos-own-2; do
    cp "$WORK/samples/$seq/overlay.gif" "sample/main_job_$seq.gif"
    cp "$WORK/samples/$seq/timeline.png" "sample/main_job_${seq}_timeline.png"
done
# The threshold sweep on the DAVIS sample with the main job's checkpoint: sample/curve_davis_sample.png
# (the sample's 2017 val sequences, 854x480; DAVIS: the sample folder, default ../shared/data/davis-sample).
DAVIS="${DAVIS:-$ROOT/../shared/data/davis-sample}"
CKPT="$(ls "$WORK"/checkpoints/demo/demo_ep*.pth | tail -n 1)"
"$PY" evaluate.py --model "$CKPT" --dset dv2017val --davis-root "$DAVIS" \
    --backbone-weights random --num-aug 1 --dev cpu --TH 1.0,0.8,0.7,0.6 --timing-runs 3 --output-root "$WORK" \
    | tee "$WORK/curve.txt"
cp "$WORK"/result/dv2017val-demo_ep*_curve_fast/curve.png sample/curve_davis_sample.png

ls -l sample/
echo "main job output in $WORK (printed report: $WORK/main_job.txt)"
