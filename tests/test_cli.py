"""The command line on bad input: every bad argument, file or folder is one line on stderr and
exit status 1, never a traceback; `satori hints --json` counts what the guest produced; `satori
run` without matplotlib fails before it boots anything. Subprocesses of the real CLI, no QEMU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import hints
from harness.cli import hint_counts

REPO = Path(__file__).resolve().parent.parent


def satori(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=timeout)


def one_clear_error(r: subprocess.CompletedProcess, needle: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr
    assert needle in r.stderr, r.stderr
    assert "error:" in r.stderr.splitlines()[0]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    files = {"binary": d / "binary.yaml", "latin1": d / "latin1.yaml", "folder": d / "folder.yaml",
             "fifo": d / "fifo.yaml", "results": d / "results-binary"}
    files["binary"].write_bytes(Path(sys.executable).resolve().read_bytes()[:4096])
    files["latin1"].write_bytes(b"name: caf\xe9\n")
    files["folder"].mkdir()
    os.mkfifo(files["fifo"])
    files["results"].mkdir()
    (files["results"] / "results.json").write_bytes(b"\x00\xff" * 100)
    return files


@pytest.mark.parametrize("args,needle", [
    (["config", "check", "{binary}"], "binary data (a NUL byte"),
    (["config", "check", "{latin1}"], "not UTF-8 text"),
    (["config", "check", "{folder}"], "a folder: a config must be"),
    (["config", "check", "{fifo}"], "not a regular file"),
    (["config", "check", "/nonexistent/x.yaml"], "cannot read the config: No such file"),
    (["run", "{binary}"], "binary data"),
    (["report", "{results}"], "not valid JSON"),
    (["report", "{folder}"], "no results.json"),
    (["image", "build", "--recipe", "{binary}"], "binary data"),
    (["vm", "up", "a", "--memory", "lots"], "'lots' is not a whole number"),
    (["vm", "up", "a", "--vcpus", "0"], "0 must be >= 1"),
    (["hints", "a", "--interval", "-1"], "-1 must be > 0"),
    (["share", "a", "--batch", "0"], "0 must be >= 1"),
    (["status", "--watch", "nan"], "nan must be >= 0"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["vm", "qmp"], "the following arguments are required"),
])
def test_bad_input_is_one_clear_error(bad_files, args, needle) -> None:
    argv = [a.format(**bad_files) for a in args]
    one_clear_error(satori(*argv), needle)


def test_run_fails_fast_without_matplotlib(tmp_path: Path) -> None:
    # a matplotlib that cannot be imported, first on the path
    fake = tmp_path / "site"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = {**os.environ, "PYTHONPATH": f"{fake}:{REPO}"}
    r = satori("run", str(REPO / "configs" / "quickstart.yaml"), "--out", str(tmp_path / "out"), env=env)
    one_clear_error(r, "cannot make plots: matplotlib does not load")
    assert "booting" not in r.stdout and not (tmp_path / "out").exists()


def test_hint_counts_say_what_the_guest_produced(tmp_path: Path) -> None:
    path = tmp_path / "ring"
    cap = hints.create_ring_file(path, 1 << 16)
    # the guest published 300 records and nobody consumed them yet
    import numpy as np

    with open(path, "r+b") as f:
        f.seek(hints.OFF_PRODUCER)
        f.write(np.uint64(300).tobytes())
        f.seek(hints.OFF_DROPPED)
        f.write(np.uint64(7).tobytes())
    with hints.HintRing(path, 1 << 30, readonly=True) as ring:
        c = hint_counts(ring.stats())
    assert (c["records"], c["consumed"], c["pending"], c["dropped"], c["valid"]) == (300, 0, 300, 7, 0)
    assert c["capacity"] == cap
