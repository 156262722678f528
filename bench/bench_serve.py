"""The dashboard as a shared service: N sessions at once, each making a sequence of selections.

The client speaks Streamlit's own websocket protocol (``/_stcore/stream``, protobuf ``BackMsg``
/ ``ForwardMsg``) from one asyncio loop: a selection is a rerun of the Explore page with
``?val=ID`` in its query string, as a click on a pair or a deep link makes, and it is over when
the server says ``script_finished``. The client costs a few milliseconds of CPU per selection
(measured and printed), so the server has the machine to itself, unlike browsers on the same
cores. The server records each page run's wall and CPU seconds (``$TRAKVIEW_TIMINGS``).

Reported per N: server-side seconds per selection (p50, p95: the page's own run), client
latency (p50, p95: request to ``script_finished``), the server's CPU seconds per selection
(``/proc`` of the Streamlit process over the phase), its resident memory per session, and the
bytes a selection sends.

    python bench/bench_serve.py demo-run/run [--sessions 1,5,20] [--selections 8]
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from bench_common import arguments, machine, md_table, write_section
from engine import files
from engine.run.layout import RunLayout

TICKS = os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _streamlit_pid(parent: int) -> int:
    """The Streamlit process `trakview serve` started (its child)."""
    for _ in range(100):
        children = Path(f"/proc/{parent}/task/{parent}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("trakview serve started no Streamlit process")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Session:
    """One browser tab, as the server sees it."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.latencies: list[float] = []
        self.bytes: list[int] = []
        self.client_cpu = 0.0

    async def select(self, query: str) -> None:
        from streamlit.proto.BackMsg_pb2 import BackMsg
        from streamlit.proto.ForwardMsg_pb2 import ForwardMsg

        msg = BackMsg()
        msg.rerun_script.query_string = query
        t0, received = time.perf_counter(), 0
        await self.ws.send(msg.SerializeToString())
        while True:
            raw = await self.ws.recv()
            c0 = time.thread_time()
            received += len(raw)
            reply = ForwardMsg()
            reply.ParseFromString(raw)
            done = reply.WhichOneof("type") == "script_finished"
            self.client_cpu += time.thread_time() - c0
            if done:
                break
        self.latencies.append(time.perf_counter() - t0)
        self.bytes.append(received)


async def _phase(url: str, n: int, queries: list[list[str]], pid: int, timings: Path) -> dict:
    import websockets

    connections = [
        await websockets.connect(url, subprotocols=["streamlit"], max_size=None) for _ in range(n)
    ]
    try:
        sessions = [Session(ws) for ws in connections]
        rss_before = _rss_mib(pid)
        await asyncio.gather(*(s.select("") for s in sessions))  # each tab's first load
        rss_after = _rss_mib(pid)
        for s in sessions:
            s.latencies.clear()
            s.bytes.clear()
        offset = timings.stat().st_size
        cpu0, wall0 = _cpu_seconds(pid), time.perf_counter()

        async def walk(session: Session, picks: list[str]) -> None:
            for val_id in picks:
                await session.select(f"val={val_id}")

        await asyncio.gather(*(walk(s, q) for s, q in zip(sessions, queries, strict=True)))
        wall = time.perf_counter() - wall0
        cpu = _cpu_seconds(pid) - cpu0
    finally:
        for ws in connections:
            await ws.close()
    with open(timings, encoding="utf-8") as fh:
        fh.seek(offset)
        runs = [json.loads(line) for line in fh if line.strip()]
    server = [r["seconds"] for r in runs if "val" in r["query"]]
    latencies = [x for s in sessions for x in s.latencies]
    selections = len(latencies)
    return {
        "n": n,
        "selections": selections,
        "server_p50": float(np.percentile(server, 50)),
        "server_p95": float(np.percentile(server, 95)),
        "server_cpu_p50": float(np.median([r["cpu_seconds"] for r in runs if "val" in r["query"]])),
        "latency_p50": float(np.percentile(latencies, 50)),
        "latency_p95": float(np.percentile(latencies, 95)),
        "cpu_per_selection": cpu / selections,
        "mib_per_session": (rss_after - rss_before) / n,
        "kib_per_selection": float(np.median([b for s in sessions for b in s.bytes])) / 1024,
        "client_ms_per_selection": 1000 * sum(s.client_cpu for s in sessions) / selections,
        "wall": wall,
    }


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("run", type=Path)
    parser.add_argument("--sessions", default="1,5,20")
    parser.add_argument("--selections", type=int, default=8, help="per session")
    args = parser.parse_args()
    val_ids = [r["id"] for r in files.read_jsonl(RunLayout(args.run).pairs("val"))]
    port = _free_port()
    timings = Path(tempfile.mkdtemp()) / "timings.jsonl"
    timings.touch()
    env = {**os.environ, "TRAKVIEW_TIMINGS": str(timings)}
    cmd = [sys.executable, "-m", "engine.cli", "serve", str(args.run), "--port", str(port)]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        pid = _streamlit_pid(proc.pid)
        for _ in range(300):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2)
                break
            except OSError:
                time.sleep(0.2)
        url = f"ws://127.0.0.1:{port}/_stcore/stream"
        rng = random.Random(0)
        warm = [[rng.choice(val_ids) for _ in range(3)]]
        asyncio.run(_phase(url, 1, warm, pid, timings))  # opens the run, fills shared caches
        rows, results = [], []
        for n in (int(x) for x in args.sessions.split(",")):
            queries = [[rng.choice(val_ids) for _ in range(args.selections)] for _ in range(n)]
            r = asyncio.run(_phase(url, n, queries, pid, timings))
            results.append(r)
            rows.append(
                (
                    r["n"],
                    r["selections"],
                    f"{r['server_p50']:.3f}",
                    f"{r['server_p95']:.3f}",
                    f"{r['latency_p50']:.3f}",
                    f"{r['latency_p95']:.3f}",
                    f"{r['cpu_per_selection']:.3f}",
                    f"{r['mib_per_session']:.1f}",
                    f"{r['kib_per_selection']:.0f}",
                    f"{r['client_ms_per_selection']:.1f}",
                )
            )
            print(rows[-1], flush=True)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    header = (
        "sessions",
        "selections",
        "server s p50",
        "server s p95",
        "latency s p50",
        "latency s p95",
        "server CPU s / selection",
        "server MiB / session",
        "KiB sent / selection",
        "client CPU ms / selection",
    )
    table = md_table(header, rows)
    print(table)
    if not args.no_write:
        write_section(
            "bench_serve",
            "### The dashboard under load (`bench_serve`)\n\n"
            f"`trakview serve` on `{args.run}` ({len(val_ids)} validation pairs); N sessions at "
            f"once through Streamlit's websocket protocol, each making {args.selections} "
            "selections of random validation pairs (a rerun of Explore with `?val=ID`), after "
            "one warm-up session. Server s: the page's own run, instrumented in the app; "
            "latency: request to `script_finished` at the client; CPU and memory: `/proc` of "
            f"the Streamlit process. {machine()}; nothing else ran. Targets: server p95 < 0.5 s "
            f"at N = 1, < 2 s at N = 20.\n\n{table}\n",
        )


if __name__ == "__main__":
    main()
