"""The tracker without PyTorch: the graphs written by `export.py` run by onnxruntime, with the host
loop of `deploy.runtime` (numpy, OpenCV). Needs deploy/requirements.txt only.

    python -m deploy --model EXPORTED_DIR --video FRAMES_OR_MP4 --mask FIRST.png --out OUT

From Python: `ExportedTracker(folder).track(frames, threshold)` (`deploy.runtime`).
"""
from .runtime import ExportedTracker, FrameResult

__all__ = ["ExportedTracker", "FrameResult"]
