"""Lint as part of the suite (uvloop and asyncpg run their linters as tests)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    if not (ROOT / "ut").is_dir():
        pytest.skip("no source tree here (tests run against an installed wheel)")
    ruff = shutil.which("ruff")
    if ruff is None:
        if os.environ.get("UT_REQUIRE_E2E", "") not in ("", "0"):
            pytest.fail("ruff is not installed (pip install '.[test]')")
        pytest.skip("ruff is not installed (pip install '.[test]')")
    r = subprocess.run([ruff, "check", "ut", "tests", "bench", "scripts", "setup.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def _mypy(*args: str) -> subprocess.CompletedProcess:
    if not (ROOT / "ut").is_dir():
        pytest.skip("no source tree here (tests run against an installed wheel)")
    if importlib.util.find_spec("mypy") is None:
        if os.environ.get("UT_REQUIRE_E2E", "") not in ("", "0"):
            pytest.fail("mypy is not installed (pip install '.[test]')")
        pytest.skip("mypy is not installed (pip install '.[test]')")
    return subprocess.run([sys.executable, "-m", "mypy", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_mypy_clean():
    """``python -m mypy ut`` with the settings of pyproject.toml's [tool.mypy]. A cold run
    takes a few seconds; its cache (.mypy_cache, not tracked) makes the next ones faster."""
    r = _mypy("ut")
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_clean_for_macos():
    """The macOS code paths (utun in TUN mode) never run in CI: mypy checks them as if on
    macOS, where ``socket.PF_SYSTEM`` and friends exist."""
    r = _mypy("--platform", "darwin", "ut/tun.py", "ut/tun_darwin.py")
    assert r.returncode == 0, r.stdout + r.stderr
