"""The main job over several seeds (a benchmark, not a test): runs `python demo.py --seed N --work
<work>/seed-N` (the offline main job, as `bash scripts/demo.sh` runs it) for every seed, each in its
own process, and prints one row per seed: reuse rate at the job's TH, J&F at TH 1.0 and at TH, the
J&F difference, the FPS ratio (TH over TH 1.0, the job's median timing runs) and which of the three
goals were met; the last line counts the seeds that met all three.

    python -m benchmarks.main_job --seeds 0-9 [--work demo_out/seeds] [--parallel 2] [-- --epochs 60]

Arguments after `--` go to every demo.py run. A seed whose folder already holds the job's report
(report.json) is not run again (delete the folder to rerun it). --parallel runs several seeds at
once, each on the job's own thread count (--threads, default 2): the same floats as one at a time,
but the FPS of runs sharing the CPU are noisier. --doc docs/main-job.md rewrites that page's marked
blocks (the table with its command, machine and date; seed 0's report and first two epochs, as its
run printed them) from the runs, so that the page shows what the code produces.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import main_job
from lib.cli import int_at_least, run
from lib.fileio import atomic_write_bytes, make_dirs

REPORT = main_job.REPORT  # written by main_job.run_main_job into its --work folder
ROOT = Path(__file__).resolve().parent.parent


def seed_list(text: str) -> list[int]:
    """argparse type: seeds as '0-9', '0,3,5' or a mix ('0-2,7') -> [0, 1, ...]."""
    seeds = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            seeds += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be seeds like 0-9 or 0,3,5, got {text!r}")
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"must name at least one seed >= 0, got {text!r}")
    return list(dict.fromkeys(seeds))


def seeds_text(seeds: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5" (as --seeds takes it)."""
    parts, start = [], 0
    for i in range(1, len(seeds) + 1):
        if i == len(seeds) or seeds[i] != seeds[i - 1] + 1:
            parts.append(f"{seeds[start]}-{seeds[i - 1]}" if i - 1 > start else str(seeds[start]))
            start = i
    return ",".join(parts)


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Run the offline main job (demo.py) over several seeds and "
                                                 "print its goals per seed.")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-9"),
                        help="seeds to run, e.g. 0-9 (default) or 0,3,5")
    parser.add_argument("--work", type=Path, default=Path("demo_out/seeds"),
                        help="folder holding one main-job folder per seed, seed-N (default demo_out/seeds)")
    parser.add_argument("--parallel", type=int_at_least(1), default=1,
                        help="seeds run at once, each in its own process (default 1)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="Markdown page whose marked blocks are rewritten from the runs (docs/main-job.md): "
                             "the table, and seed 0's report and first two epochs (seed 0 must be among --seeds)")
    parser.add_argument("job_args", nargs="*", metavar="-- DEMO_ARGS",
                        help="arguments for every demo.py run (after --), e.g. -- --epochs 60")
    return parser


def run_seed(seed: int, work: Path, job_args: list[str]) -> dict:
    """The main job for one seed in its own process (output in work/main_job.txt) -> its report.json,
    with "seconds" (the run's wall time; absent when the report was there before)."""
    report = work / REPORT
    if not report.is_file():
        make_dirs(work, "the seed's work folder", "--work")
        command = [sys.executable, str(ROOT / "demo.py"), "--seed", str(seed), "--work", str(work), *job_args]
        start = time.perf_counter()
        with open(work / "main_job.txt", "w") as out, open(work / "main_job.err", "w") as err:
            code = subprocess.run(command, cwd=ROOT, stdout=out, stderr=err).returncode
        if code != 0 or not report.is_file():
            raise RuntimeError(f"seed {seed}: demo.py exited with status {code}; see {work / 'main_job.err'}")
        data = json.loads(report.read_text())
        data["seconds"] = time.perf_counter() - start
        return data
    return json.loads(report.read_text())


def table(reports: dict[int, dict]) -> str:
    """One row per seed and the count of seeds that met all goals."""
    head = f"{'seed':>4} {'reuse':>7} {'J&F TH 1.0':>11} {'J&F TH':>8} {'diff':>6} {'FPS ratio':>10}  goals (reuse, J&F, FPS)  {'time':>6}"
    lines = [head]
    for seed, r in reports.items():
        met = r["goals_met"]
        marks = ", ".join("met" if m else "MISSED" for m in met)
        seconds = f"{r['seconds']:.0f} s" if "seconds" in r else "-"
        lines.append(f"{seed:>4} {r['reuse_rate'] * 100:>6.1f}% {r['jf_plain'] * 100:>11.1f} {r['jf'] * 100:>8.1f} "
                     f"{(r['jf'] - r['jf_plain']) * 100:>+6.1f} {r['fps'] / r['fps_plain']:>9.2f}x  "
                     f"{marks:<23} {seconds:>6}")
    all_met = [seed for seed, r in reports.items() if all(r["goals_met"])]
    th = {r["threshold"] for r in reports.values()}
    lines.append(f"TH {', '.join(f'{t:g}' for t in sorted(th))}: {len(all_met)} of {len(reports)} seeds met all "
                 f"three goals" + (f" (missed: {', '.join(str(s) for s in reports if s not in all_met)})"
                                   if len(all_met) < len(reports) else ""))
    return "\n".join(lines)


def machine() -> str:
    """The CPU's model name and the core count, e.g. "AMD EPYC 7B13, 2 cores"."""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, flags=re.M).group(1).strip()
    except (OSError, AttributeError):
        name = platform.processor() or platform.machine()
    return f"{name}, {os.cpu_count()} cores"


def replace_block(text: str, name: str, content: str) -> str:
    """`text` with the lines between `<!-- name -->` and `<!-- /name -->` replaced by a text code
    block holding `content`."""
    pattern = re.compile(rf"(<!-- {re.escape(name)} -->\n).*?(<!-- /{re.escape(name)} -->)", flags=re.S)
    if not pattern.search(text):
        raise ValueError(f"--doc: no block marked <!-- {name} --> ... <!-- /{name} -->")
    return pattern.sub(lambda m: f"{m.group(1)}```text\n{content.rstrip()}\n```\n{m.group(2)}", text, count=1)


def seed0_blocks(printed: str) -> tuple[str, str]:
    """From a main-job run's printed output: (its report: from the table's head to the end, its
    first two epochs' statistics lines without the checkpoint path)."""
    lines = printed.splitlines()
    head = next(i for i, line in enumerate(lines) if "TH 1.0 (always compute)" in line)
    epochs = [line.split(" -> ")[0] for line in lines if re.match(r"epoch [12]/\d+: loss_seg", line)]
    return "\n".join(lines[head:]), "\n".join(epochs)


def write_doc(path: Path, args: argparse.Namespace, reports: dict[int, dict]) -> None:
    """Rewrite the marked blocks of the Markdown page `path` (see the module's docstring)."""
    if 0 not in reports:
        raise ValueError("--doc: seed 0 must be among --seeds (the page shows its report)")
    command = f"python -m benchmarks.main_job --seeds {seeds_text(args.seeds)}" + (
        f" -- {' '.join(args.job_args)}" if args.job_args else "")
    when = f"{command}\n{machine()}, {time.strftime('%Y-%m-%d', time.gmtime())}\n"
    report, epochs = seed0_blocks((args.work / "seed-0" / "main_job.txt").read_text())
    text = path.read_text()
    for name, content in (("seeds", when + table(reports)), ("seed-0 report", report), ("seed-0 epochs", epochs)):
        text = replace_block(text, name, content)
    atomic_write_bytes(path, text.encode())
    print(f"wrote {path}")


def main(args: argparse.Namespace) -> dict[int, dict]:
    print(f"main job over seeds {', '.join(map(str, args.seeds))}: {sys.executable} demo.py --seed N --work "
          f"{args.work}/seed-N {' '.join(args.job_args)} ({args.parallel} at a time)", flush=True)

    def one(seed: int) -> tuple[int, dict]:
        report = run_seed(seed, args.work / f"seed-{seed}", args.job_args)
        print(f"seed {seed}: goals {'all met' if all(report['goals_met']) else 'NOT all met'}", flush=True)
        return seed, report

    with ThreadPoolExecutor(args.parallel) as pool:
        reports = dict(sorted(pool.map(one, args.seeds)))
    print(table(reports))
    if args.doc is not None:
        write_doc(args.doc, args, reports)
    return reports


if __name__ == "__main__":
    run(main, get_parser())
