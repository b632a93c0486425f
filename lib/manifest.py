"""The manifest of an exported tracker (`export.py` writes it, the runtime without PyTorch in
`deploy/` reads it): one home for its format and its checks, importable without PyTorch.

An exported folder holds one ONNX file per graph and `manifest.json`:
    {"format": "reuse-vos-onnx", "format_version": 1,
     "checkpoint": {"path", "sha256"}, "backbone", "has_gate", "backbone_weights",
     "target_model": {TargetModelConfig fields, "fast"}, "num_aug", "seed",
     "opset", "precision": "fp32" | "int8",
     "graphs": {name: {"file", "sha256", "bytes", "inputs", "outputs", "precision"}},
     "calibration": {...} (int8 only), "versions": {package: version}}
A folder that fails a check raises UsageError naming the file and what fixes it (export again).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from lib.errors import UsageError

FORMAT = "reuse-vos-onnx"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# The graphs every export has; a G-FRTM export (has_gate) also has GATE_GRAPHS.
GRAPHS = ("backbone_low", "backbone_high", "target_scores", "object_start", "target_init", "decode_computed",
          "memory_encode", "optimize_filters", "merge")
GATE_GRAPHS = ("gate", "decode_reused")
_KEYS = ("checkpoint", "backbone", "has_gate", "target_model", "num_aug", "seed", "opset", "precision", "graphs")


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | os.PathLike, flag: str = "--model") -> dict:
    """The checked manifest of an exported folder. Raises FileNotFoundError for a missing folder,
    UsageError for a missing, corrupt or incompatible manifest."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag}: exported folder not found: {folder} (make one with export.py)")
    path = folder / MANIFEST
    hint = "export the checkpoint again with export.py"
    if not path.is_file():
        raise UsageError(f"{flag}: {folder} has no {MANIFEST}: not a folder written by export.py ({hint})")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"{flag}: {path} is not valid JSON ({exc}); {hint}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{flag}: {path} is not a reuse-vos export manifest (format is not {FORMAT!r}); {hint}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise UsageError(f"{flag}: {path} has format version {manifest.get('format_version')!r}, this runtime "
                         f"reads version {FORMAT_VERSION}; {hint}")
    missing = [k for k in _KEYS if k not in manifest]
    if missing:
        raise UsageError(f"{flag}: {path} lacks {missing}; {hint}")
    wanted = GRAPHS + (GATE_GRAPHS if manifest["has_gate"] else ())
    absent = [g for g in wanted if not isinstance(manifest["graphs"].get(g), dict)]
    if absent:
        raise UsageError(f"{flag}: {path} lists no graph {absent}; {hint}")
    return manifest


def graph_file(folder: str | os.PathLike, manifest: dict, name: str, flag: str = "--model",
               verify: bool = True) -> Path:
    """The path of graph `name`, checked against the manifest: present, of the recorded size and
    (`verify`) sha256. Raises UsageError for a missing, truncated or altered graph."""
    entry = manifest["graphs"][name]
    path = Path(folder).expanduser() / entry["file"]
    hint = "export the checkpoint again with export.py"
    if not path.is_file():
        raise UsageError(f"{flag}: graph {name} missing: {path} does not exist; {hint}")
    size = path.stat().st_size
    if size != entry["bytes"]:
        raise UsageError(f"{flag}: graph {path} is {size} bytes, the manifest says {entry['bytes']} "
                         f"(truncated or replaced); {hint}")
    if verify and file_sha256(path) != entry["sha256"]:
        raise UsageError(f"{flag}: graph {path} does not match the sha256 in {MANIFEST} (altered); {hint}")
    return path
