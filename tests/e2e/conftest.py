"""Fixtures for the real-WireGuard end-to-end tests (see docs/testing.md).

Off CI, a machine without root, a tool, TUN, namespaces or the installed ``ut-tunnel``
console script *skips* these tests with the reason. With ``UT_REQUIRE_E2E=1`` (CI) the
same missing prerequisite is a *failure*.

``UT_E2E_KEEP=1`` keeps the bed's work directory (configs, certificates, logs) after the
run and prints where it is.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from ut._testbase import netbed

REQUIRE = os.environ.get("UT_REQUIRE_E2E", "") not in ("", "0")
KEEP = os.environ.get("UT_E2E_KEEP", "") not in ("", "0")
BIG_FILE_SIZE = 64 * 1024 * 1024


def _missing(reasons: list[str]) -> None:
    """Skip (default) or fail (UT_REQUIRE_E2E=1) when prerequisites are missing."""
    if not reasons:
        return
    msg = "end-to-end prerequisites missing: " + "; ".join(reasons)
    if REQUIRE:
        pytest.fail(msg + " (UT_REQUIRE_E2E=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(msg)


def _tunnel_cli_problem() -> str | None:
    try:
        cmd = netbed.ut_tunnel_command()
    except netbed.BedError as exc:
        return str(exc)
    try:
        res = subprocess.run([*cmd, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`ut-tunnel --version` did not run: {exc}"
    if res.returncode != 0:
        return f"`ut-tunnel --version` failed ({res.returncode}): {res.stderr.strip()[:500]}"
    return None


@pytest.fixture(scope="session")
def bed_ready() -> None:
    """Root, tools, TUN and network namespaces are there (enough for the bed itself).
    Also removes beds left behind by runs that were killed (their owner pid is gone)."""
    _missing(netbed.missing_prerequisites())
    netbed.remove_stale_beds()


@pytest.fixture(scope="session")
def tunnel_ready(bed_ready) -> None:
    """The ``ut-tunnel`` console script is installed and answers ``--version``."""
    problem = _tunnel_cli_problem()
    _missing([problem] if problem else [])


@pytest.fixture(scope="module")
def bed(bed_ready, tmp_path_factory):
    """One bed per test module: cloud + two homes, UDP dropped between them, WireGuard up."""
    workdir = tmp_path_factory.mktemp("netbed") if not KEEP else None
    b = netbed.NetBed(homes=2, workdir=str(workdir) if workdir else None, keep_workdir=KEEP)
    try:
        b.up()
        yield b
    finally:
        problems = b.teardown()
        if not KEEP:  # keep configs and logs in pytest's tmp dir, not the big files
            for f in b.wd.rglob("*.bin"):
                f.unlink(missing_ok=True)
        if KEEP:
            print(f"\nnetbed work directory kept: {b.wd}")
        assert not problems, f"bed teardown problems: {problems}"


def _reset(bed: netbed.NetBed, start: int) -> None:
    """Stop every process started since ``start`` and put the bed back as it was
    (UDP dropped, WireGuard peers pointed at the tunnel client, sessions forgotten)."""
    for t in reversed(bed._tracked[start:]):
        bed.stop(t.proc, timeout=5)
    if not bed.drop_udp:
        bed.set_drop_udp(True)
    bed.use_tunnel()
    bed.reset_wireguard()


@pytest.fixture
def plain_bed(bed):
    """The bed without the tunnel (for tests of the bed itself)."""
    start = bed.test_start = len(bed._tracked)
    yield bed
    _reset(bed, start)


@pytest.fixture(scope="module")
def pki(bed, tunnel_ready):
    """Certificates from ``ut-tunnel pki``: server name ``ut-cloud``, clients ``home``, ``home2``."""
    return bed.pki()


@pytest.fixture
def tun(bed, pki):
    """The bed, ready for the tunnel; whatever the test starts is stopped after it."""
    start = bed.test_start = len(bed._tracked)
    yield bed
    _reset(bed, start)


@pytest.fixture(scope="module")
def big_file(bed):
    """A 64 MiB random file served from the cloud's HTTP root: (path, sha256)."""
    root = bed.wd / "www"
    root.mkdir(exist_ok=True)
    path = root / "big.bin"
    return path, netbed.make_random_file(path, BIG_FILE_SIZE)


@pytest.fixture(scope="module")
def http_url(bed, big_file):
    """Base URL of the HTTP server on the cloud's WireGuard address (GET files, PUT uploads)."""
    return bed.start_http_server(bed.wd / "www")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """On a failed e2e test, attach the tails of the tunnel and WireGuard logs."""
    outcome = yield
    report = outcome.get_result()
    if report.when != "call" or not report.failed:
        return
    b = item.funcargs.get("bed")
    if not isinstance(b, netbed.NetBed):
        return
    start = getattr(b, "test_start", 0)
    for i, t in enumerate(b._tracked):
        mine = i >= start and t.name.startswith(("ut-", "curl"))
        if t.log and t.log.exists() and (mine or "wireguard" in t.name):
            lines = [ln for ln in t.log.read_text(errors="replace").splitlines()
                     if not ln.startswith(("\u2502", "\u250c", "\u2514"))]  # wireguard-go banner
            tail = "\n".join(lines[-40:])
            report.sections.append((f"log {t.log.name} (pid {t.proc.pid})", tail))
