"""The three wings and their arrows (ARCHITECTURE.md), checked on the real code.

The import-linter contracts live in pyproject.toml. The client lives in its own top-level
folder (client/) but is imported as weightd.client, which import-linter cannot see from the
folders alone; so the test lays the package out as Python imports it (file links in a
temporary tree) and runs ``lint-imports`` there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _as_imported(tmp: Path) -> Path:
    """A tree where weightd/client/ holds client/'s files: what the import system sees."""
    for src_root, dst_root in (
        (ROOT / "weightd", tmp / "weightd"),
        (ROOT / "client", tmp / "weightd" / "client"),
    ):
        for folder, dirs, files in os.walk(src_root):
            dirs[:] = [d for d in dirs if d != "__pycache__"]
            dst = dst_root / Path(folder).relative_to(src_root)
            dst.mkdir(parents=True, exist_ok=True)
            for f in files:
                if f.endswith(".py"):
                    (dst / f).symlink_to(Path(folder) / f)
    (tmp / "pyproject.toml").symlink_to(ROOT / "pyproject.toml")
    return tmp


def _lint(tree: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([str(lint), "--no-cache"], cwd=tree, env=env, capture_output=True, text=True)


def test_import_contracts_hold(tmp_path):
    out = _lint(_as_imported(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout, out.stdout


def test_import_contracts_catch_a_client_importing_the_daemon(tmp_path):
    tree = _as_imported(tmp_path)
    bad = tree / "weightd" / "client" / "mapping.py"
    text = bad.read_text()
    bad.unlink()
    bad.write_text(text + "\nfrom weightd.daemon import store  # noqa\n")
    out = _lint(tree)
    assert out.returncode != 0 and "weightd.client.mapping -> weightd.daemon.store" in out.stdout, out.stdout


def test_import_contracts_catch_the_readers_importing_each_other(tmp_path):
    """checkpoint may use hf (a folder is read by it), never the other way: the circle the two
    once made through imports inside functions is caught, function-level imports included."""
    tree = _as_imported(tmp_path)
    bad = tree / "weightd" / "daemon" / "hf.py"
    text = bad.read_text()
    bad.unlink()
    bad.write_text(text + "\n\ndef _circle():\n    from weightd.daemon import checkpoint  # noqa\n")
    out = _lint(tree)
    assert out.returncode != 0 and "weightd.daemon.hf -> weightd.daemon.checkpoint" in out.stdout, out.stdout


@pytest.mark.parametrize("module", ["weightd.client", "weightd.client.connection", "weightd.cli"])
def test_importing_the_client_loads_nothing_of_the_daemon_or_bench(module):
    code = (
        f"import sys, {module}\n"
        "bad = sorted(m for m in sys.modules if m.startswith(('weightd.daemon', 'weightd.bench')))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import {module} loaded {out.stdout.strip()}"


def test_the_code_is_formatted_and_lint_clean():
    ruff = Path(sys.executable).with_name("ruff")
    for args in (["check", "."], ["format", "--check", "."]):
        out = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, f"ruff {' '.join(args)}:\n{out.stdout}{out.stderr}"
