"""tls.client_auth: proof — the client proof (ut.proof) and lanes through the gate (ut.gate).

Real certificates (ut._testbase.certs), real TLS on loopback, both event loops.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ut
from ut._testbase.certs import TestPki
from ut._testbase.tunnelkit import (
    UdpEcho,
    UdpPeer,
    capture_events,
    client_config,
    run_on,
    server_config,
    tunnel,
    wait_for,
)
from ut.proof import MAX_SKEW_SECONDS, ClientProver, ProofVerifier

PROOF = {"tls": {"client_auth": "proof"}}
HOST = "vpn.example"
BIND = b"\x07" * 12


def _prover(pki: TestPki, cert: tuple[Path, Path] | None = None) -> ClientProver:
    cert_path, key_path = cert or pki.client("home")
    return ClientProver(pki.ca, cert_path, key_path)


# ------------------------------------------------------------------ the proof itself


def test_a_good_proof_names_the_client_and_keeps_what_follows(pki: TestPki) -> None:
    req = _prover(pki).request(HOST, BIND)
    assert req.startswith(b"GET /") and req.endswith(b"\r\n\r\n")
    res = ProofVerifier(pki.ca).check(req + b"HELLO", host=HOST, binding=BIND)
    assert res.ok and res.cn == "home" and res.rest == b"HELLO"


@pytest.mark.parametrize("case, reason", [
    ("expired", "expired"),
    ("other_ca", "unknown_ca"),
    ("server_cert", "bad_certificate"),   # serverAuth only: not a client certificate
    ("other_binding", "bad_proof"),       # lifted into another TLS connection
    ("other_host", "bad_proof"),
    ("replay", "bad_proof"),
    ("clock", "clock_skew"),
])
def test_refused_proofs_say_why(pki: TestPki, case: str, reason: str) -> None:
    verifier = ProofVerifier(pki.ca)
    now = time.time()
    binding, host = BIND, HOST
    if case == "expired":
        req = _prover(pki, pki.client("old", expired=True)).request(HOST, BIND)
    elif case == "other_ca":
        req = _prover(pki, pki.client("evil", other_ca=True)).request(HOST, BIND)
    elif case == "server_cert":
        req = _prover(pki, (pki.server_cert, pki.server_key)).request(HOST, BIND)
    elif case == "clock":
        req = _prover(pki).request(HOST, BIND, now=now - MAX_SKEW_SECONDS - 30)
    else:
        req = _prover(pki).request(HOST, BIND)
        binding = b"\x08" * 12 if case == "other_binding" else BIND
        host = "other.example" if case == "other_host" else HOST
        if case == "replay":
            assert verifier.check(req, host=host, binding=binding).ok
    res = verifier.check(req, host=host, binding=binding, now=now)
    assert not res.ok and res.reason == reason, res
    assert res.text and "ut-tunnel" not in res.text.lower() or reason != "clock_skew"


def test_without_the_ca_no_proof_path(pki: TestPki, tmp_path: Path) -> None:
    """A prober that does not hold the CA certificate cannot make a path that passes:
    its request is 'no_proof' (a visitor), not a refused client."""
    from ut._testbase.certs import make_test_pki

    stranger = make_test_pki(tmp_path / "other")
    cert, key = stranger.client("home")
    req = ClientProver(stranger.ca, cert, key).request(HOST, BIND)
    assert ProofVerifier(pki.ca).check(req, host=HOST, binding=BIND).reason == "no_proof"
    for probe in (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01garbage\r\n\r\n",
                  b"GET /" + b"A" * 54 + b" HTTP/1.1\r\nHost: x\r\n\r\n"):
        assert ProofVerifier(pki.ca).check(probe, host=None, binding=b"").reason == "no_proof"


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2048), binding=st.binary(max_size=16))
def test_the_verifier_never_raises(pki: TestPki, data: bytes, binding: bytes) -> None:
    res = ProofVerifier(pki.ca).check(data + b"\r\n\r\n", host=None, binding=binding)
    assert not res.ok and res.reason


def test_fallback_needs_proof_mode(pki: TestPki) -> None:
    with pytest.raises(ut.ConfigError, match=r"fallback\.addr: is only used with tls\.client_auth: proof"):
        server_config(pki, ("127.0.0.1", 9), _extra={
            "tls": {"client_auth": "handshake"}, "fallback": {"addr": "127.0.0.1:8080"}})
    cfg = server_config(pki, ("127.0.0.1", 9), _extra={"fallback": {"addr": "127.0.0.1:8080"}})
    assert cfg.tls.client_auth == "proof" and cfg.fallback.addr == "127.0.0.1:8080"


# ------------------------------------------------------------------ lanes through the gate


def test_tunnel_with_proof(pki: TestPki, loop_kind: str) -> None:
    async def main() -> None:
        async with tunnel(pki, server_tcp={"_extra": PROOF}, client_tcp={"_extra": PROOF}) as t:
            sent = [b"datagram %d" % i for i in range(200)]
            for d in sent:
                t.peer.send(d)
            assert sorted(await t.peer.drain(200, 15)) == sorted(sent)
            assert await wait_for(lambda: t.client.stats()["lanes_active"] == 5, 10)
            (sess,) = t.server.stats()["sessions"]
            assert sess["client_cn"] == "home" and sess["lanes"] == 5
            assert t.server.stats()["handshake_failures"] == {}
            assert t.server.stats()["web_face"] == {}
            assert t.client.transport.resumed(t.client.session.lanes[4].transport)

    run_on(loop_kind, main())


@pytest.mark.parametrize("who", ["expired", "other_ca", "handshake_mode"])
def test_refused_clients_get_the_web_face_never_a_lane(pki: TestPki, loop_kind: str, who: str) -> None:
    async def main() -> None:
        echo = UdpEcho().start()
        server = ut.Server(server_config(pki, echo.address, _extra=PROOF))
        await server.start()
        cert = {"expired": pki.client("old", expired=True),
                "other_ca": pki.client("evil", other_ca=True), "handshake_mode": None}[who]
        mode = {"tls": {"client_auth": "handshake" if who == "handshake_mode" else "proof"}}
        client = ut.Client(client_config(pki, server.address[:2], cert=cert, _extra=mode))
        with capture_events() as events:
            await client.start()
            peer = await UdpPeer.open(client.udp_address[:2])
            try:
                peer.send(b"let me in")
                assert await wait_for(
                    lambda: client.stats()["handshake_failures"].get("refused_by_server", 0) >= 2, 15)
                assert echo.received == 0 and server.stats()["sessions"] == []
                assert server.stats()["web_face"].get("site", 0) >= 2
                failures = server.stats()["handshake_failures"]
                if who == "handshake_mode":  # sent no proof at all: a visitor, not a refusal
                    assert failures == {}
                else:
                    reason = {"expired": "expired", "other_ca": "unknown_ca"}[who]
                    assert failures.get(reason, 0) >= 2
                    refused = [e for e in events.named("tls_handshake_fail") if e.get("stage") == "proof"]
                    assert refused and refused[0]["reason"] == reason
                fails = [e for e in events.named("tls_handshake_fail")
                         if e.get("reason") == "refused_by_server"]
                assert fails and "web server" in fails[0]["err"]
            finally:
                peer.close()
                await client.close()
                await server.close()
                echo.close()

    run_on(loop_kind, main())


def test_proof_is_one_flight_with_hello(pki: TestPki) -> None:
    """The proof adds no round trip: a lane is open as fast as with handshake mTLS
    (median of 20 first lanes each, same run; generous bound for a shared machine)."""
    async def first_lane(extra: dict) -> float:
        async with tunnel(pki, lanes=1, server_tcp={"_extra": extra},
                          client_tcp={"_extra": extra}) as t:
            t0 = time.perf_counter()
            t.peer.send(b"x")
            assert await t.peer.recv(10) == b"x"
            return time.perf_counter() - t0

    async def main() -> tuple[float, float]:
        hs = sorted([await first_lane({}) for _ in range(9)])[4]
        pr = sorted([await first_lane(PROOF) for _ in range(9)])[4]
        return hs, pr

    hs, pr = run_on("uvloop", main(), timeout=120)
    assert pr < hs * 2 + 0.005, (hs, pr)


def test_silent_connection_is_not_a_client_and_uses_no_lane(pki: TestPki) -> None:
    async def main() -> None:
        echo = UdpEcho().start()
        server = ut.Server(server_config(pki, echo.address, _extra=PROOF))
        await server.start()
        try:
            server.transport.gate.face.header_timeout = 0.5  # type: ignore[union-attr]
            reader, writer = await asyncio.open_connection(*server.address[:2])
            t0 = time.perf_counter()
            assert await asyncio.wait_for(reader.read(), 5) == b""
            assert 0.4 < time.perf_counter() - t0 < 2.0
            writer.close()
            assert server.stats()["sessions"] == []
        finally:
            await server.close()
            echo.close()

    run_on("asyncio", main())
