"""The examples users copy from run as they are, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def weightd_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("weightd.")}


def test_quickstart():
    before = weightd_segments()
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr
    attached = [line for line in out.stdout.splitlines() if line.startswith("worker ")]
    assert len(attached) == 3 and all("generation 1" in a and "0 weights copied, tied=True" in a for a in attached), out.stdout
    assert "published generation 2" in out.stdout and "refreshed to generation 2" in out.stdout
    assert weightd_segments() <= before, "the example's daemon removed its segments"
