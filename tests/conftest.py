"""Shared test fixtures: where the golden vectors and the sample data live."""
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED = Path(os.environ.get("RVOS_SHARED", ROOT.parent / "shared"))
GOLDEN = Path(os.environ.get("RVOS_GOLDEN", SHARED / "golden"))
# Tracker vectors (golden/README.md's `*_tracker*.pt` format): the shared set and ours made with
# upstream's code by scripts/make_upstream_vectors.py; RVOS_TRACKER_VECTORS (directories separated
# by os.pathsep) replaces both.
TRACKER_VECTOR_DIRS = [Path(p) for p in os.environ.get(
    "RVOS_TRACKER_VECTORS", os.pathsep.join([str(GOLDEN), str(ROOT / "tests" / "golden_upstream")])).split(os.pathsep)]
DAVIS_SAMPLE = SHARED / "data" / "davis-sample"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _restore_thread_count():
    """A test that changes torch's thread count (a benchmark's --threads) must not change the
    numbers of later tests (e.g. a vector made in process and checked in a subprocess)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", autouse=True)
def _temporary_inductor_cache(tmp_path_factory):
    """torch.compile's generated code goes to a cache under pytest's temporary root (kept from
    one run to the next, as pytest keeps that root), never into the user's ~/.cache; subprocesses
    inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.getbasetemp().parent / "inductor-cache"))
        yield


@pytest.fixture
def cheap_compile(monkeypatch) -> list:
    """The backends trackers were asked to compile with (`--compile` reached them); the regions
    are compiled with aot_eager whatever was asked (seconds, not minutes)."""
    import models.tracker

    real, asked = models.tracker.build_regions, []

    def cheap(network, backbone, device, compile=False):
        if compile:
            asked.append("inductor" if compile is True else compile)
            compile = "aot_eager"
        return real(network, backbone, device, compile)

    monkeypatch.setattr(models.tracker, "build_regions", cheap)
    return asked


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    if not GOLDEN.is_dir():
        pytest.fail(f"golden vectors not found at {GOLDEN} (set RVOS_GOLDEN)")
    return GOLDEN


@pytest.fixture(scope="session")
def davis_sample() -> Path:
    if not DAVIS_SAMPLE.is_dir():
        pytest.fail(f"DAVIS sample not found at {DAVIS_SAMPLE} (set RVOS_SHARED)")
    return DAVIS_SAMPLE


def seeded_backbone_state(ftext: str, seed: int, checksum: float) -> dict:
    """The backbone weights the golden vectors were made with (golden/README.md): seeded
    torchvision weights, checked against the vector's checksum; skip on mismatch, as the README
    says (a different torch version builds different weights)."""
    import torchvision

    torch.manual_seed(seed)
    state = getattr(torchvision.models, ftext)(weights=None).state_dict()
    total = sum(v.double().sum().item() for k, v in state.items() if v.is_floating_point() and not k.startswith("fc."))
    if abs(total - checksum) > 1e-6 * max(1.0, abs(checksum)):
        pytest.skip(f"torch {torch.__version__} builds different seeded {ftext} weights "
                    f"(checksum {total} != {checksum}): cannot compare")
    return state


# ---------------------------------------------------------------------------------------------
# Unusable output paths: every script answers with one `error:` line and exit status 2


@pytest.fixture
def blocked(tmp_path) -> Path:
    """A regular file: a folder asked for under it cannot be made (NotADirectoryError)."""
    path = tmp_path / "a-file"
    path.write_text("not a folder\n")
    return path


def run_script(monkeypatch, capsys, main, parser, argv) -> tuple[int, str]:
    """main(args) through lib.cli.run as the shell runs it, with `argv` -> (exit status, stderr)."""
    from lib.cli import run

    monkeypatch.setattr(sys, "argv", ["script", *map(str, argv)])
    capsys.readouterr()
    try:
        run(main, parser)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_output_error(code: int, err: str, blocker: Path) -> None:
    """One `error:` line that names the file standing where a folder should be, and exit 2."""
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: cannot create "), err
    assert f"{blocker} is a file, not a folder" in lines[0], err


read_only_folders = pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                                       reason="root ignores folder permissions")
