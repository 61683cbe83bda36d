"""``ut-tunnel demo``: a whole tunnel on loopback, with nothing of the user's.

It makes a throwaway PKI, runs a server with a UDP echo behind it (standing in
for WireGuard) and a client in front of it, sends paced datagrams through with
the ``udpmon`` probe, and prints what came back. Everything runs in this one
process on 127.0.0.1, so it also works as a quick install check.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path
from typing import Any

from . import fastpath, runtime
from ._version import __version__
from .client import Client
from .config import load_config
from .logs import setup_logging
from .pki import init_pki, issue_client
from .server import Server
from .udpmon import UdpEcho, run_probe


async def run_demo(
    seconds: float = 3.0, lanes: int = 5, rate: int = 2000, size: int = 1200
) -> dict[str, Any]:
    """Run the demo and return its figures (the CLI prints them)."""
    with tempfile.TemporaryDirectory(prefix="ut-demo-") as tmp:
        d = Path(tmp)
        init_pki(d, server_name="localhost", ips=["127.0.0.1"])
        cert, key = issue_client(d, "demo-home")
        echo = UdpEcho("127.0.0.1", 0)
        echo_addr = await echo.start()
        echo_task = asyncio.ensure_future(echo.run())
        server = Server(load_config({
            "role": "server",
            "tcp": {"listen_addr": "127.0.0.1:0", "lanes": lanes},
            "udp": {"wg_udp_addr": f"127.0.0.1:{echo_addr[1]}"},
            "metrics": {"enabled": False},
            "tls": {"ca_cert": str(d / "ca.pem"), "cert": str(d / "server.pem"),
                    "key": str(d / "server.key")},
        }))
        await server.start()
        client = Client(load_config({
            "role": "client",
            "tcp": {"server_addr": f"127.0.0.1:{server.address[1]}", "lanes": lanes},
            "udp": {"listen_addr": "127.0.0.1:0"},
            "metrics": {"enabled": False},
            "tls": {"ca_cert": str(d / "ca.pem"), "cert": str(cert), "key": str(key),
                    "server_name": "localhost"},
        }))
        await client.start()
        try:
            result = await run_probe(
                ("127.0.0.1", client.udp_address[1]), rate=rate, size=size,
                duration=seconds, wait=1.0,
            )
            cst, sst = client.stats(), server.stats()
        finally:
            await client.close()
            await server.close()
            echo_task.cancel()
            echo.close()
    probe = result.to_json()
    return {
        "version": __version__,
        "implementation": fastpath.IMPLEMENTATION,
        "loop": runtime.loop_name(),
        "sent": probe["sent"],
        "returned": probe["received"],
        "lost": probe["lost"],
        "loss_pct": probe["loss_pct"],
        "rtt_ms": probe["rtt_ms"],
        "achieved_pps": probe["rate"]["achieved_pps"],
        "lanes_used": sum(1 for n in cst["lane_tx_frames"] if n),
        "lanes": lanes,
        "client_lane_frames": cst["lane_tx_frames"],
        "server_lane_frames": sst["lane_tx_frames"],
        "dropped": cst["dropped"] + sst["dropped"],
    }


def format_summary(r: dict[str, Any]) -> str:
    rtt = r["rtt_ms"]
    return "\n".join([
        f"ut-tunnel {r['version']} demo: {r['implementation']} fast path on {r['loop']}",
        f"  datagrams sent {r['sent']}, returned {r['returned']}, "
        f"lost {r['lost']} ({r['loss_pct']:.2f} %), dropped in tunnel {r['dropped']}",
        (f"  round trip p50 {rtt.get('p50')} ms, p95 {rtt.get('p95')} ms, max {rtt.get('max')} ms"
         if rtt.get("p50") is not None else "  round trip: no datagram came back"),
        f"  lanes used {r['lanes_used']} of {r['lanes']}: client->server frames per lane "
        f"{r['client_lane_frames']}, server->client {r['server_lane_frames']}",
        f"  rate achieved {r['achieved_pps']:.0f} datagrams/s",
    ])


def main(args: argparse.Namespace) -> int:
    setup_logging("warning")
    r = runtime.run(run_demo(args.seconds, args.lanes, args.rate, args.size))
    print(format_summary(r))
    return 0 if r["returned"] and r["lost"] == 0 else 1
