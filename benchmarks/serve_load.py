"""Load on ``qwen-export serve``: N concurrent streaming clients against the real server.

Starts ``qwen-export serve ARTIFACT`` on a free loopback port (its own process), waits for
``/health``, then for each client count sends ``--requests`` chat requests (each client one at a
time, all clients together) and reports aggregate completion tokens/s, time to first token and
per-token latency (p50/p99), each client count against one client. The server generates one request
at a time (no continuous batching yet), so aggregate throughput stays about one client's while TTFT
grows with the queue: this is the baseline a batching scheduler must beat.

    .venv/bin/python benchmarks/serve_load.py OUT [--clients 1,4,16] [--requests 32] [--max-tokens 32]
        [--json benchmarks/results/serve_load.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--clients", default="1,4,16", help="comma-separated client counts")
    parser.add_argument("--requests", type=int, default=32, help="requests per client count")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=0, help="engine threads of the server")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    args = parser.parse_args()
    counts = [int(c) for c in args.clients.split(",")]
    port = free_port()
    command = [harness.cli_path(), "serve", str(args.artifact), "--port", str(port), "--threads", str(args.threads)]
    command += ["--max-queue", str(max(counts))]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_healthy(port, server)
        harness.log(f"serving {args.artifact} on port {port}")
        one_request(port, args.max_tokens, -1)  # warm-up
        rows = []
        for clients in counts:
            row = run_clients(port, clients, args.requests, args.max_tokens)
            row["throughput_vs_1"] = row["tokens_per_s"] / rows[0]["tokens_per_s"] if rows else 1.0
            rows.append(row)
            harness.log(
                f"{clients:>3} clients: {row['tokens_per_s']:7.1f} tok/s ({row['throughput_vs_1']:.2f}x), "
                f"TTFT p50 {row['ttft_p50_s'] * 1e3:.0f} ms p99 {row['ttft_p99_s'] * 1e3:.0f} ms, "
                f"per token p50 {row['per_token_p50_s'] * 1e3:.1f} ms p99 {row['per_token_p99_s'] * 1e3:.1f} ms"
            )
    finally:
        server.terminate()
        server.wait(30)
    if args.json is not None:
        report = {"artifact": str(args.artifact), "host": harness.host(), "max_tokens": args.max_tokens, "rows": rows}
        harness.write_json(args.json, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
