"""``qwen-export serve --ray``: the app as a Ray Serve deployment with 2 replicas behind Ray's proxy,
on a local Ray, driven by the official ``openai`` client. Skipped (with its reason) without the
``ray`` extra."""

from __future__ import annotations

import http.client
import socket
import time

import pytest

import qwen_export

serve = pytest.importorskip("ray.serve", reason="the ray extra is not installed (pip install 'qwen-export[ray]')")

MODEL = "tiny"
ASK = [{"role": "user", "content": "Hello"}]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        conn.request("GET", "/health")
        status = conn.getresponse().status
        conn.close()
        return status == 200
    except OSError:
        return False


def test_two_replicas_behind_rays_proxy(export) -> None:
    import openai
    import ray

    from qwen_export.serve.ray import DEPLOYMENT, deployment

    artifact = export("qwen2_tied")
    want = qwen_export.load(artifact).chat(ASK, max_tokens=5, temperature=0).text
    port = free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        app = deployment(artifact, replicas=2, cpus_per_replica=0.5, model_name=MODEL, max_batch=2)
        serve.run(app, name=DEPLOYMENT, route_prefix="/", blocking=False)
        replicas = serve.status().applications[DEPLOYMENT].deployments[DEPLOYMENT].replica_states
        assert replicas == {"RUNNING": 2}, replicas
        deadline = time.monotonic() + 120
        while sum(healthy(port) for _ in range(6)) < 6 and time.monotonic() < deadline:  # both replicas loaded
            time.sleep(0.5)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        for _ in range(4):
            reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0)
            assert reply.choices[0].message.content == want and reply.usage.completion_tokens == 5
        chunks = list(
            client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
        with pytest.raises(openai.BadRequestError, match="only n=1"):
            client.chat.completions.create(model=MODEL, messages=ASK, n=2)
    finally:
        serve.shutdown()
        ray.shutdown()
