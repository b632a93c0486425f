"""Long videos: memory does not grow with the number of frames.

One process tracks a 160-frame 120x216 video (davis-layout, every frame annotated, 2 objects)
through the whole evaluation (decoding thread, tracker, PNG writer thread, J&F from the PNGs
one frame at a time); its resident memory is sampled as frames are read. Holding anything per
frame would show: a probability map is 104 KB per frame and object, so keeping them from frame
40 to 160 adds 25 MB; peak RSS of separate processes is too noisy (+-17 MB here) to compare.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from dataset.synthetic_layouts import make_folder_like

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 160

SCRIPT = r"""
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from pathlib import Path
import evaluation.tracking
from evaluate import get_parser, main
from models.checkpoint import save_checkpoint
from models.network import GFRTM

PAGE = os.sysconf("SC_PAGE_SIZE")
rss = {}
read_ahead = evaluation.tracking.read_ahead

def sampled(items, depth):
    def frames():
        for i, item in enumerate(items):
            with open("/proc/self/statm") as f:
                rss[i] = int(f.read().split()[1]) * PAGE
            yield item
    return read_ahead(frames(), depth)

evaluation.tracking.read_ahead = sampled
work = Path(sys.argv[2])
torch.manual_seed(0)
save_checkpoint(work / "rn18.pth", GFRTM("resnet18").eval())
results = main(get_parser().parse_args([
    "--model", str(work / "rn18.pth"), "--backbone-weights", "random", "--num-aug", "1", "--dev", "cpu",
    "--dset", "davis-layout", "--data-root", str(work / "data"), "--output-root", str(work), "--TH", "0.5"]))
with open("/proc/self/statm") as f:
    after = int(f.read().split()[1]) * PAGE
print(json.dumps({"rss": rss, "after_jf": after, "frames": results["frames"],
                  "scored": sum(o["num_frames"] for s in results["sequences"].values() for o in s["objects"].values())}))
"""


def test_memory_stays_flat(tmp_path):
    # Written here: the generator renders the whole video in memory.
    make_folder_like(tmp_path / "data", "davis", num_sequences=1, num_frames=FRAMES, size=(120, 216), annotated="all")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ROOT), str(tmp_path)], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["frames"] == FRAMES and out["scored"] == 2 * (FRAMES - 2)  # J&F read every frame
    rss = {int(k): v / 2 ** 20 for k, v in out["rss"].items()}
    growth = rss[FRAMES - 1] - rss[40]
    assert growth < 8, f"resident memory grew by {growth:.1f} MB from frame 40 to {FRAMES}"
    assert out["after_jf"] / 2 ** 20 - rss[FRAMES - 1] < 8  # scoring does not load the video
