"""lib.cli's error handling and shared flags, the atomic writer (lib.fileio) and the resize
functions (lib.image_io)."""
from __future__ import annotations

import argparse
import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import demo
import evaluate
import train
from lib import fileio
from lib.cli import UsageError, cpu_threads, run
from lib.errors import OutputError
from conftest import read_only_folders
from lib.image_io import (read_image, resize_image_area, resize_image_bilinear, resize_labels_nearest,
                          resize_labels_nearest_exact)


@pytest.mark.parametrize("error", [UsageError("--x: bad value"), FileNotFoundError("--y: no such file: z")])
def test_user_mistakes_print_one_error_line_and_exit_2(error, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog"])

    def main(args):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        run(main, argparse.ArgumentParser())
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"error: {error}\n"


@pytest.mark.parametrize("error", [ValueError("an internal bug"), KeyError("k"), RuntimeError("r")])
def test_other_exceptions_keep_their_traceback(error, capsys, monkeypatch):
    monkeypatch.setattr("sys.argv", ["prog"])

    def main(args):
        raise error

    with pytest.raises(type(error)):
        run(main, argparse.ArgumentParser())
    assert "error:" not in capsys.readouterr().err


@pytest.mark.parametrize("world_size, body, code", [("1", "pass", 0), ("2", "pass", 0),
                                                     ("1", "raise UsageError('--x: bad')", 2),
                                                     ("2", "raise UsageError('--x: bad')", 2)])
def test_torchrun_workers_exit_without_finalization(world_size, body, code):
    """Under torchrun (WORLD_SIZE > 1) run() ends the process with os._exit after flushing its
    output, so no interpreter teardown (where gloo's threads can abort the process) happens:
    atexit handlers are a sign of that teardown."""
    script = ("import atexit, argparse\nfrom lib.cli import UsageError, run\n"
              "atexit.register(lambda: print('finalized'))\n"
              f"def main(args):\n    print('done', end='')\n    {body}\n"
              "run(main, argparse.ArgumentParser())\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(root)})
    assert out.returncode == code, out.stderr
    assert out.stdout.startswith("done")  # flushed before leaving
    assert ("finalized" in out.stdout) == (world_size == "1")
    assert ("error: --x: bad" in out.stderr) == (code == 2)


@pytest.mark.parametrize("world_size", ["1", "2"])
def test_sigterm_prints_one_line_with_what_is_kept(world_size):
    """SIGTERM while main() runs: one `error:` line ending with `kept`, status 143; under torchrun
    (WORLD_SIZE 2, no torchrun store here) also while the main thread is blocked outside Python."""
    import signal

    script = ("import argparse, sys, threading\nfrom lib.cli import run\n"
              "def main(args):\n    print('ready', flush=True)\n    threading.Event().wait(600)\n"
              "run(main, argparse.ArgumentParser(), kept='the X is kept')\n")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "WORLD_SIZE": world_size, "PYTHONPATH": str(root)})
    try:
        assert proc.stdout.readline() == "ready\n"  # main() runs, the handler is in place
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [line for line in err.splitlines() if line]  # under torchrun after a newline (a bar may be mid-line)
    assert len(lines) == 1 and lines[0].startswith("error: stopped by SIGTERM") and "(the X is kept)" in lines[0]


def test_error_line_is_claimed_once_through_the_store(monkeypatch):
    """lib.distributed.ErrorLine against a TCPStore as torchrun's agent serves it: the first
    claim wins, later ones lose and wait until the line is printed."""
    import datetime
    import threading

    import torch.distributed as dist

    from lib.distributed import ErrorLine

    server = dist.TCPStore("127.0.0.1", 0, is_master=True, timeout=datetime.timedelta(seconds=30))
    env = {"TORCHELASTIC_USE_AGENT_STORE": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(server.port),
           "TORCHELASTIC_RUN_ID": "test", "TORCHELASTIC_RESTART_COUNT": "0"}
    first, second, third = ErrorLine(env), ErrorLine(env), ErrorLine(env)
    assert first.claim() and not second.claim() and not third.claim()
    waited = threading.Thread(target=second.wait_printed)
    waited.start()
    waited.join(timeout=0.5)
    assert waited.is_alive()  # not printed yet
    first.printed()
    waited.join(timeout=ErrorLine.WAIT_SECONDS)
    assert not waited.is_alive()
    # Another restart of the job counts again; without a store every process prints.
    assert ErrorLine({**env, "TORCHELASTIC_RESTART_COUNT": "1"}).claim()
    assert ErrorLine({}).claim() and ErrorLine({}).claim()


def test_usage_error_is_a_value_error():
    assert issubclass(UsageError, ValueError)


def test_shared_flags_are_declared_once_with_one_help_text():
    parsers = {"evaluate": evaluate.get_parser(), "demo": demo.video_parser(), "train": train.get_parser(),
               "demo job": demo.main_job_parser()}
    everywhere = ("evaluate", "demo", "train", "demo job")
    shared = {"--dev": everywhere, "--seed": everywhere, "--num-aug": everywhere,
              "--backbone-weights": ("evaluate", "demo", "train"),
              "--TH": ("evaluate", "demo job")}  # demo.py --video: one threshold
    for flag, scripts in shared.items():
        actions = [next(a for a in parsers[s]._actions if flag in a.option_strings) for s in scripts]
        assert len({a.help for a in actions}) == 1, flag
        assert len({getattr(a.type, "__name__", a.type) for a in actions}) == 1, flag
    demo_video = ["--video", "v", "--mask", "m.png", "--model", "c.pth"]
    defaults = {s: p.parse_args(["--dev", "cpu", *(demo_video if s == "demo" else [])]) for s, p in parsers.items()}
    assert [defaults[s].num_aug for s in ("evaluate", "demo", "train", "demo job")] == [5, 5, 15, 5]
    assert defaults["demo"].TH == defaults["demo job"].TH == defaults["evaluate"].TH == 0.7


def test_the_runtime_without_pytorch_shares_the_own_video_flags():
    """python -m deploy declares --video, --mask, --TH and --max-size where demo.py --video does
    (lib.flags, which imports no PyTorch): the same help, type and default."""
    pytest.importorskip("onnxruntime", reason="onnxruntime is not installed: pip install -r requirements-export.txt")
    from deploy.__main__ import get_parser

    parsers = (demo.video_parser(), get_parser())
    for flag in ("--video", "--mask", "--TH", "--max-size"):
        demo_action, deploy_action = (next(a for a in p._actions if flag in a.option_strings) for p in parsers)
        assert (deploy_action.option_strings, deploy_action.help, deploy_action.type, deploy_action.default) == \
            (demo_action.option_strings, demo_action.help, demo_action.type, demo_action.default), flag
    threads = next(a for a in parsers[1]._actions if "--threads" in a.option_strings)
    assert threads.help.startswith("CPU threads (onnxruntime's intra-op threads)") and threads.default is None


def test_threads_flag_is_shared_and_its_count_is_restored():
    import torch

    from benchmarks import precision_fidelity, precision_ops, tracker_speed, train_speed
    parsers = {"demo": demo.main_job_parser(), "precision_fidelity": precision_fidelity.get_parser(),
               "precision_ops": precision_ops.get_parser(), "tracker_speed": tracker_speed.get_parser(),
               "train_speed": train_speed.get_parser()}
    defaults = {name: p.parse_args(["--model", "x"] if name == "precision_fidelity" else []).threads
                for name, p in parsers.items()}
    assert defaults == {"demo": 2, "precision_fidelity": 2, "precision_ops": 2, "tracker_speed": 2,
                        "train_speed": None}
    for name, p in parsers.items():
        action = next(a for a in p._actions if "--threads" in a.option_strings)
        assert action.help.startswith("CPU threads (torch.set_num_threads)"), name
        for bad in ("0", "-1", "two"):
            with pytest.raises(SystemExit):
                p.parse_args(["--threads", bad])
    before = torch.get_num_threads()
    seen = []
    with cpu_threads(before + 1):
        seen.append(torch.get_num_threads())
        with cpu_threads(None):
            seen.append(torch.get_num_threads())
    with pytest.raises(RuntimeError):
        with cpu_threads(1):
            raise RuntimeError("the block failed")
    assert seen == [before + 1, before + 1] and torch.get_num_threads() == before


def test_atomic_write_fsyncs_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(fileio.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    path = tmp_path / "f.bin"
    fileio.atomic_write_bytes(path, b"old")
    assert path.read_bytes() == b"old" and len(synced) == 1
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~fileio.UMASK

    def fail(f):
        f.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OutputError, match=f"cannot create {path}: disk full"):
        fileio.atomic_write(path, fail)
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_resize_functions_keep_their_interpolation():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    small = (12, 16)
    # Area and bilinear shrinking differ; enlarging with "area" is bilinear.
    assert not np.array_equal(resize_image_area(image, small), resize_image_bilinear(image, small))
    np.testing.assert_array_equal(resize_image_area(image, (60, 80)), resize_image_bilinear(image, (60, 80)))
    assert resize_image_area(image, (30, 40)) is image and resize_image_bilinear(image, (30, 40)) is image
    # torch 'nearest' takes source index floor(i * 3), centre-aligned nearest round((i + 0.5) * 3 - 0.5).
    labels = np.arange(9, dtype=np.uint8)[None].repeat(2, axis=0)
    np.testing.assert_array_equal(resize_labels_nearest(labels, (2, 3))[0], [0, 3, 6])
    np.testing.assert_array_equal(resize_labels_nearest_exact(labels, (2, 3))[0], [1, 4, 7])


def test_corrupt_image_is_a_usage_error(tmp_path):
    path = tmp_path / "x.jpg"
    path.write_bytes(b"not a jpeg")
    with pytest.raises(UsageError, match="cannot decode image"):
        read_image(path)


def test_make_dirs_names_the_path_the_reason_and_the_flag(tmp_path, blocked, monkeypatch):
    made = fileio.make_dirs(tmp_path / "a" / "b", "the results folder", "--output-root")
    assert made == tmp_path / "a" / "b" and made.is_dir()
    assert fileio.make_dirs(made) == made  # already there: fine
    for path in (blocked / "x" / "y", blocked):  # under a file, and the file itself
        with pytest.raises(OutputError) as info:
            fileio.make_dirs(path, "the results folder", "--output-root")
        assert str(info.value) == (f"cannot create the results folder {path}: {blocked} is a file, not a folder "
                                   f"(choose another with --output-root)")
    with pytest.raises(OutputError, match="too long"):
        fileio.make_dirs(tmp_path / ("n" * 300))
    # a read-only file system (simulated: root could write anywhere here)
    def read_only(self, *args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(self))
    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(OutputError, match=f"cannot create the output folder {tmp_path / 'ro'}: read-only file system"):
        fileio.make_dirs(tmp_path / "ro")


def test_atomic_write_and_temp_dirs_under_a_file_are_output_errors(tmp_path, blocked):
    with pytest.raises(OutputError, match=f"{blocked} is a file, not a folder"):
        fileio.atomic_write_bytes(blocked / "f.json", b"{}")
    with pytest.raises(OutputError, match=f"{blocked} is a file, not a folder"):
        fileio.make_temp_dir(blocked, ".x.", ".partial")
    assert blocked.read_text() == "not a folder\n" and sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


@read_only_folders
def test_read_only_folder_is_an_output_error(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="permission"):
            fileio.make_dirs(folder)
        with pytest.raises(OutputError, match="ermission denied"):
            fileio.atomic_write_bytes(folder / "f.json", b"{}")
    finally:
        folder.chmod(0o755)
