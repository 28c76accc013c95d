"""Load on ``qwen-export serve``: N concurrent streaming clients against the real server.

Starts ``qwen-export serve ARTIFACT`` on a free loopback port (its own process), waits for
``/health``, then for each client count sends ``--requests`` chat requests (each client one at a
time, all clients together) and reports aggregate completion tokens/s, time to first token and
per-token latency (p50/p99), each client count against one client. It does so once per
``--max-batch`` value: 1 serves the requests one at a time (the baseline), more decodes them
together (continuous batching). The machine's load average is recorded before and after each run
(figures taken while other work ran are labelled so in benchmarks/README.md).

    .venv/bin/python benchmarks/serve_load.py OUT [--clients 1,4,16] [--max-batch 1,16] [--requests 32]
        [--max-tokens 32] [--json benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import harness


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(port: int, server: subprocess.Popen, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with status {server.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server was not healthy within {timeout_s:.0f} s")


def one_request(port: int, max_tokens: int, index: int) -> dict[str, float]:
    """One streamed chat request: TTFT (first content chunk), tokens, wall time."""
    body = {
        "messages": [{"role": "user", "content": f"Request {index}: tell me a story about the sea."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"HTTP {response.status}: {response.read()[:300]!r}")
    first, tokens = None, 0
    for raw in response:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    end = time.perf_counter()
    conn.close()
    first = first if first is not None else end
    return {
        "ttft_s": first - start,
        "tokens": tokens,
        "wall_s": end - start,
        "per_token_s": (end - first) / max(tokens - 1, 1),
    }


def run_clients(port: int, clients: int, requests: int, max_tokens: int) -> dict[str, Any]:
    results: list[dict[str, float]] = []
    lock, counter = threading.Lock(), iter(range(requests))

    def client() -> None:
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            result = one_request(port, max_tokens, index)
            with lock:
                results.append(result)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    ttft, per_token = [r["ttft_s"] for r in results], [r["per_token_s"] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "ttft_p50_s": harness.percentile(ttft, 50),
        "ttft_p99_s": harness.percentile(ttft, 99),
        "per_token_p50_s": harness.percentile(per_token, 50),
        "per_token_p99_s": harness.percentile(per_token, 99),
        "wall_s": wall,
    }


def serve_and_load(args: argparse.Namespace, counts: list[int], max_batch: int) -> list[dict[str, Any]]:
    """One server with ``--max-batch max_batch``; every client count against it."""
    port = free_port()
    command = [harness.cli_path(), "serve", str(args.artifact), "--port", str(port), "--threads", str(args.threads)]
    command += ["--max-queue", str(max(counts)), "--max-batch", str(max_batch)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows: list[dict[str, Any]] = []
    try:
        wait_healthy(port, server)
        harness.log(f"serving {args.artifact} on port {port} with --max-batch {max_batch}")
        one_request(port, args.max_tokens, -1)  # warm-up
        for clients in counts:
            load_before = os.getloadavg()[0]
            row = run_clients(port, clients, args.requests, args.max_tokens)
            row |= {
                "max_batch": max_batch,
                "loadavg_1min_before": load_before,
                "loadavg_1min_after": os.getloadavg()[0],
            }
            row["throughput_vs_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
            rows.append(row)
            harness.log(
                f"max-batch {max_batch:>2}, {clients:>3} clients: {row['tokens_per_s']:7.1f} tok/s "
                f"({row['throughput_vs_1']:.2f}x), TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms "
                f"p99 {row['ttft_p99_s'] * 1e3:.0f} ms, per token p50 {row['per_token_p50_s'] * 1e3:.1f} ms "
                f"p99 {row['per_token_p99_s'] * 1e3:.1f} ms (load {load_before:.1f} -> {row['loadavg_1min_after']:.1f})"
            )
    finally:
        server.terminate()
        server.wait(30)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--max-batch", default="1,16", help="comma-separated server --max-batch values")
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="engine threads of the server")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    uptime_before = Path("/proc/loadavg").read_text().strip()
    rows = [row for batch in args.max_batch.split(",") for row in serve_and_load(args, counts, int(batch))]
    uptime_after = Path("/proc/loadavg").read_text().strip()
    harness.log(f"/proc/loadavg before: {uptime_before}; after: {uptime_after} ({os.cpu_count()} CPUs)")
    if args.json is not None:
        report = {
            "artifact": str(args.artifact),
            "host": harness.host(),
            "max_tokens": args.max_tokens,
            "loadavg_before": uptime_before,
            "loadavg_after": uptime_after,
            "rows": rows,
        }
        harness.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
