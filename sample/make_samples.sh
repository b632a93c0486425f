#!/usr/bin/env bash
# Regenerate the sample GIFs and timelines in sample/ from the offline main job (demo.py without
# --video, = scripts/demo.sh): seeded synthetic data, brief CPU training with a random backbone,
# evaluation at TH 1.0 and 0.7. Offline, CPU, a few minutes on 2 cores.
#
#   bash sample/make_samples.sh          # WORK: the main job's --work folder (default a temp dir)
#
# The GIFs are redrawn from the main job's TH 0.7 results with visualize.py at 160 px wide (the
# main job's own overlays are full size) to keep the repository small.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
WORK="${WORK:-$(mktemp -d)}"
mkdir -p "$WORK"

"$PY" demo.py --work "$WORK" --dev cpu | tee "$WORK/main_job.txt"
RESULTS="$(ls -d "$WORK"/result/ytvos-layout-demo_ep*_0.7_fast | tail -n 1)"
"$PY" visualize.py --results "$RESULTS" --frames "$WORK/synthetic-val/JPEGImages" \
    --out "$WORK/samples" --no-mp4 --gif-width 160

rm -f sample/main_job_*.gif sample/main_job_*_timeline.png
for seq in ytvos-own-0 ytvos-own-1 ytvos-own-2; do
    cp "$WORK/samples/$seq/overlay.gif" "sample/main_job_$seq.gif"
    cp "$WORK/samples/$seq/timeline.png" "sample/main_job_${seq}_timeline.png"
done
ls -l sample/
echo "main job output in $WORK (printed report: $WORK/main_job.txt)"
