"""The examples users copy from run as they are, and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import segments

ROOT = Path(__file__).resolve().parent.parent


def test_quickstart(instance):
    # The example's daemon gets this test's instance (every option is also $WEIGHTD_SERVE_*), so
    # the `instance` fixture finds and fails on any segment it leaves.
    env = dict(os.environ, WEIGHTD_SERVE_INSTANCE=instance)
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    attached = [line for line in out.stdout.splitlines() if line.startswith("worker ")]
    assert len(attached) == 3 and all(
        "generation 1" in a and "0 weights copied, tied=True" in a for a in attached
    ), out.stdout
    assert "published generation 2" in out.stdout and "refreshed to generation 2" in out.stdout
    assert segments(instance) == [], "the example's daemon removed its segments"
