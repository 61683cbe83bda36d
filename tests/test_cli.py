"""The ``ut-tunnel`` console script as a user runs it: real processes, real files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import ut


def ut_cmd() -> list[str]:
    exe = shutil.which("ut-tunnel")
    return [exe] if exe else [sys.executable, "-m", "ut"]


def run(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*ut_cmd(), *args], capture_output=True, text=True, timeout=timeout, **kw
    )


class LoggedProcess:
    """A tunnel process whose JSON-lines stderr a thread collects as it comes."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [*ut_cmd(), "-config", str(config)], stderr=subprocess.PIPE, text=True,
        )
        self.events: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.events.append(json.loads(line))  # every line must be JSON

    def named(self, name: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == name]

    def wait_event(self, name: str, timeout: float = 15, count: int = 1) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.named(name)
            if len(found) >= count:
                return found[0]
            time.sleep(0.02)
        raise AssertionError(f"no {name} event; saw {[e.get('event') for e in self.events]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._reader.join(5)
        return rc


def test_version():
    r = run("--version")
    assert r.returncode == 0
    assert ut.__version__ in r.stdout and ut.IMPLEMENTATION in r.stdout


def test_no_arguments_is_a_usage_error():
    r = run()
    assert r.returncode == 2
    assert "-config" in r.stderr


def test_config_error_names_file_and_key(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("role: client\ntcp:\n  server_addr: 'x:1'\n  lanez: 3\n")
    r = run("-config", str(cfg))
    assert r.returncode == 2
    assert str(cfg) in r.stderr and "tcp.lanez" in r.stderr


def test_demo_runs_and_summarises():
    r = run("demo", "--seconds", "1", "--rate", "300", timeout=90)
    assert r.returncode == 0, r.stderr
    assert "returned" in r.stdout and "lanes used" in r.stdout
    assert ut.IMPLEMENTATION in r.stdout


def test_pki_then_tunnel_processes_then_sigterm(tmp_path):
    """pki init/client, a server and a client process, traffic, SIGTERM → GOODBYE, exit 0."""
    pki = tmp_path / "pki"
    assert run("pki", "init", str(pki), "--server-name", "localhost",
               "--ip", "127.0.0.1").returncode == 0
    assert run("pki", "client", str(pki), "home").returncode == 0
    assert oct((pki / "home.key").stat().st_mode & 0o777) == "0o600"

    echo = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    echo.bind(("127.0.0.1", 0))
    echo.settimeout(10)
    (tmp_path / "server.yaml").write_text(
        "role: server\n"
        "tcp: {listen_addr: '127.0.0.1:0', lanes: 3}\n"
        f"udp: {{wg_udp_addr: '127.0.0.1:{echo.getsockname()[1]}'}}\n"
        "metrics: {enabled: false}\n"
        "tls: {ca_cert: pki/ca.pem, cert: pki/server.pem, key: pki/server.key}\n"
    )
    server = LoggedProcess(tmp_path / "server.yaml")
    client = None
    try:
        start = server.wait_event("start")
        assert start["version"] == ut.__version__ and start["role"] == "server"
        assert start["implementation"] in ("compiled", "pure")
        assert "config" in start
        port = int(start["tcp_listen"].rsplit(":", 1)[1])
        (tmp_path / "client.yaml").write_text(
            "role: client\n"
            f"tcp: {{server_addr: '127.0.0.1:{port}', lanes: 3}}\n"
            "udp: {listen_addr: '127.0.0.1:0'}\n"
            "metrics: {enabled: false}\n"
            "tls: {ca_cert: pki/ca.pem, cert: pki/home.pem, key: pki/home.key,"
            " server_name: localhost}\n"
        )
        client = LoggedProcess(tmp_path / "client.yaml")
        udp_port = int(client.wait_event("start")["udp_listen"].rsplit(":", 1)[1])
        wg = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        wg.settimeout(10)
        wg.sendto(b"ping", ("127.0.0.1", udp_port))
        data, back = echo.recvfrom(65535)  # the server's session port
        assert data == b"ping"
        echo.sendto(b"pong", back)
        assert wg.recvfrom(65535)[0] == b"pong"
        client.wait_event("lane_open", count=3)  # lanes after the first dial with a stagger
        assert client.stop() == 0
        # The server saw the client's GOODBYE on every lane.
        server.wait_event("lane_close", count=3)
        closes = server.named("lane_close")
        assert all(c["reason"] == "peer_goodbye_shutdown" for c in closes), closes
        assert server.stop(signal.SIGINT) == 0
        assert any(e.get("event") == "stop" for e in server.events)
    finally:
        if client is not None and client.proc.poll() is None:
            client.proc.kill()
        if server.proc.poll() is None:
            server.proc.kill()
        echo.close()


def test_python_dash_m_ut_is_the_console_script():
    r = subprocess.run([sys.executable, "-m", "ut", "--version"], capture_output=True,
                       text=True, timeout=30, env={**os.environ})
    assert r.returncode == 0 and ut.__version__ in r.stdout


# ------------------------------------------------------------- check and flags


def _pki_and_config(tmp_path: Path, extra: str = "") -> Path:
    pki = tmp_path / "pki"
    assert run("pki", "init", str(pki), "--server-name", "vpn.example.com").returncode == 0
    assert run("pki", "client", str(pki), "home").returncode == 0
    cfg = tmp_path / "home.yaml"
    cfg.write_text(
        "role: client\n"
        "tcp:\n  server_addr: 'vpn.example.com:5443'\n  lanes: 3\n"
        "tls: {ca_cert: pki/ca.pem, cert: pki/home.pem, key: pki/home.key}\n" + extra
    )
    return cfg


def test_check_prints_the_effective_config_and_exits_0(tmp_path):
    import yaml

    from ut.config import SCHEMA, SECTIONS

    cfg = _pki_and_config(tmp_path)
    for argv in (["check", "-config", str(cfg)], ["-config", str(cfg), "check"],
                 ["check", f"--config={cfg}"], ["--config", str(cfg), "check"]):
        r = run(*argv)
        assert r.returncode == 0, (argv, r.stderr)
        assert r.stdout.rstrip().endswith(f"# OK: {cfg} is a valid client configuration")
        shown = yaml.safe_load(r.stdout)  # the output is YAML (facts are comments)
        assert shown["role"] == "client" and shown["tcp"]["lanes"] == 3
        assert shown["tls"]["cert"] == str(tmp_path / "pki" / "home.pem")
        assert shown["tls"]["server_name"] == "vpn.example.com"
        # Every key of the schema that a client uses is shown, defaults included.
        for section in SECTIONS:
            want = {k for k, spec in SCHEMA[section].items() if "client" in spec.roles}
            assert want <= set(shown.get(section, ())), (section, want)
        assert "CN=home" in r.stdout and "signed by tls.ca_cert" in r.stdout
    # What check shows is what start-up loads.
    assert ut.load_config(yaml.safe_load(r.stdout)).tcp == ut.load_config(cfg).tcp


def test_check_fails_with_the_start_up_message(tmp_path):
    cfg = _pki_and_config(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.read_text().replace("lanes: 3", "lanez: 3"))
    r = run("check", "-config", str(bad))
    assert r.returncode == 2 and r.stdout == ""
    assert str(bad) in r.stderr and "tcp.lanez" in r.stderr and "Traceback" not in r.stderr
    # A key that does not belong to the certificate: found by check, not at the first dial.
    mismatched = tmp_path / "mismatch.yaml"
    mismatched.write_text(cfg.read_text().replace("pki/home.key", "pki/server.key"))
    r = run("check", "-config", str(mismatched))
    assert r.returncode == 2 and "does not belong to the certificate" in r.stderr
    r = run("check")
    assert r.returncode == 2 and "check needs -config" in r.stderr


def test_config_flag_is_refused_where_it_means_nothing(tmp_path):
    r = run("-config", str(tmp_path / "x.yaml"), "demo")
    assert r.returncode == 2 and "-config is not used by demo" in r.stderr


def test_demo_rejects_out_of_range_values_without_a_traceback():
    for flag, value, words in (
        ("--lanes", "0", "between 1 and 64"), ("--lanes", "65", "between 1 and 64"),
        ("--rate", "0", "between 1 and"), ("--rate", "-5", "between 1 and"),
        ("--size", "10", "between 28 and 65507"), ("--size", "70000", "between 28 and 65507"),
        ("--seconds", "0", "between 0.1 and 3600"), ("--seconds", "nan", "between 0.1"),
        ("--seconds", "-1", "between 0.1"), ("--rate", "fast", "not a whole number"),
    ):
        r = run("demo", flag, value, timeout=30)
        assert r.returncode == 2, (flag, value, r.stderr)
        assert f"argument {flag}: " in r.stderr and words in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


def test_demo_summary_without_replies_says_so():
    from ut.demo import format_summary

    text = format_summary({
        "version": "x", "implementation": "pure", "loop": "asyncio", "sent": 0, "returned": 0,
        "lost": 0, "loss_pct": 0.0, "rtt_ms": {"p50": None, "p95": None, "max": None},
        "achieved_pps": 0.0, "lanes_used": 0, "lanes": 1, "client_lane_frames": [0],
        "server_lane_frames": [0], "dropped": 0,
    })
    assert "None" not in text and "no datagram came back" in text
