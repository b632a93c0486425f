"""python -m tools.gate_report: the gate report (evaluation.gate_report) of two evaluate.py result
folders, printed and optionally written as JSON."""
from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from evaluation import gate_report as gate_report_module
from lib.cli import run
from lib.fileio import atomic_write_bytes, make_dirs
from lib.metrics import json_safe


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=gate_report_module.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gated", type=Path, required=True,
                   help="evaluate.py results folder at the gate's threshold (e.g. result/<name>_0.7_fast)")
    p.add_argument("--plain", type=Path, required=True,
                   help="evaluate.py results folder of the same checkpoint and frames at TH 1.0")
    p.add_argument("--annotations", type=Path, required=True,
                   help="ground truth: <sequence>/<frame>.png for every frame (e.g. a DAVIS "
                        "Annotations/480p folder or a YouTube-VOS-layout folder's Annotations)")
    p.add_argument("--json", type=Path, default=None, help="also write the summary to this JSON file")
    return p


def main(args: argparse.Namespace) -> dict:
    summary = gate_report_module.gate_report(args.gated, args.plain, args.annotations)
    print(gate_report_module.format_summary(summary))
    data = asdict(summary)
    if args.json is not None:
        make_dirs(args.json.parent, "the --json file's folder", "--json")
        atomic_write_bytes(args.json, (json.dumps(json_safe(data), indent=1) + "\n").encode())
    return data


if __name__ == "__main__":
    run(main, get_parser())
