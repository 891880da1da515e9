"""`satori hints NAME --json` on a real VM with hints and no sharing engine: ``records`` is what
the guest produced, none consumed, all pending."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def satori(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_hints_json_counts_what_the_guest_produced(image):
    r = satori("vm", "up", "hjson", "--memory", "384")
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        r = satori("vm", "ssh", "hjson", "--", "cat /data/set1/f0001.bin > /dev/null")  # 4 MiB cold
        assert r.returncode == 0, r.stdout + r.stderr
        r = satori("hints", "hjson", "--json")
        assert r.returncode == 0, r.stderr
        snap = json.loads(r.stdout)
        assert snap["records"] >= 1024, snap  # at least the file's 1024 pages were reported
        assert snap["consumed"] == 0 and snap["valid"] == 0  # no engine reads this ring
        assert snap["pending"] == snap["records"] <= snap["capacity"]
        assert snap["guest_state"] == 1
    finally:
        satori("vm", "down", "hjson")
