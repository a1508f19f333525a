"""The official `openai` Python client, unchanged, against `edgeroute router`: chat (JSON and
stream), files.create, batches.create/retrieve/list/cancel, files.content. And a single async
request whose webhook is verified by the independent `standardwebhooks` package.

Two simulator nodes, a discovery replica and one router process with `[jobs]` on SQLite."""

import base64
import http.server
import json
import secrets
import threading
import time

import httpx
import openai
import pytest
from standardwebhooks.webhooks import Webhook

from conftest import SECRET, free_port


def sim(tokens_per_s: float) -> str:
    return ('[backend]\nkind = "sim"\n[backend.sim]\nseed = 3\nttft_base_ms = 5\n'
            f'tokens_per_s = {tokens_per_s}\n')


@pytest.fixture
def router(start_node, start_discovery, start_proc, workdir):
    """Returns (base_url, mint, whsec) for a router over two nodes at `tokens_per_s`."""

    def start(tokens_per_s: float = 2000.0):
        tor, mint, _ = start_node(sim(tokens_per_s), node_id="tor-1", region="toronto")
        mtl, _, _ = start_node(sim(tokens_per_s), node_id="mtl-1", region="montreal")
        discovery = start_discovery([("tor-1", tor, "toronto"), ("mtl-1", mtl, "montreal")], "sim-llama")
        whsec = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()
        (workdir / "whsec").write_text(whsec)
        port = free_port()
        cfg = workdir / "router.toml"
        cfg.write_text(
            f'[router]\nid = "router-py"\nlisten = "127.0.0.1:{port}"\ndiscovery = ["{discovery}"]\n'
            f'[auth]\nhs256_secret_file = "{workdir / "secret"}"\n'
            f'[jobs]\nstore = "sqlite:{workdir / "jobs.db"}"\n'
            f'delegation_key_file = "{workdir / "secret"}"\ndelegation_alg = "hs256"\n'
            f'webhook_secret_files = ["{workdir / "whsec"}"]\nwebhook_allowed_hosts = ["127.0.0.1"]\n'
            'tick_ms = 200\nlease_ms = 5000\nworkers = 4\n')
        start_proc(["router", "--config", str(cfg)], f"http://127.0.0.1:{port}/health", "router")
        return f"http://127.0.0.1:{port}", mint, whsec

    return start


def client(base, token):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=20)


def batch_input(n: int, max_tokens: int) -> bytes:
    return "".join(json.dumps({
        "custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "sim-llama", "max_tokens": max_tokens,
                 "messages": [{"role": "user", "content": f"question {i}"}]},
    }) + "\n" for i in range(n)).encode()


def wait_batch(c, batch_id: str, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        rc = b.request_counts
        assert rc.completed + rc.failed <= rc.total
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.time() < deadline, f"batch {batch_id} still {b.status}"
        time.sleep(0.2)


def test_the_openai_client_runs_chat_and_the_batch_api_unchanged(router, workdir):
    base, mint, _ = router()
    c = client(base, mint("acme"))
    msgs = [{"role": "user", "content": "Which node is closest to Toronto?"}]
    full = c.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=8)
    assert full.choices[0].message.content
    streamed = "".join(ch.choices[0].delta.content or "" for ch in
                       c.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=8, stream=True)
                       if ch.choices)
    assert streamed == full.choices[0].message.content

    path = workdir / "in.jsonl"
    path.write_bytes(batch_input(10, 4))
    f = c.files.create(file=open(path, "rb"), purpose="batch")
    assert f.object == "file" and f.purpose == "batch" and f.bytes == path.stat().st_size
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                         completion_window="24h", metadata={"run": "py"})
    assert b.object == "batch" and b.status == "in_progress" and b.metadata == {"run": "py"}
    done = wait_batch(c, b.id)
    assert done.status == "completed"
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (10, 10, 0)
    lines = [json.loads(l) for l in c.files.content(done.output_file_id).text.splitlines()]
    assert sorted(l["custom_id"] for l in lines) == sorted(f"req-{i}" for i in range(10))
    assert all(l["response"]["status_code"] == 200 for l in lines)
    assert all(l["response"]["body"]["choices"][0]["message"]["content"] for l in lines)
    listed = c.batches.list(limit=10)
    assert [x.id for x in listed.data] == [b.id]

    # Another tenant sees none of it.
    other = client(base, mint("other"))
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert other.batches.list().data == []


def test_cancel_through_the_openai_client_ends_cancelled_with_counts_that_add_up(router, workdir):
    base, mint, _ = router(tokens_per_s=40.0)
    c = client(base, mint("acme"))
    path = workdir / "slow.jsonl"
    path.write_bytes(batch_input(12, 200))
    f = c.files.create(file=open(path, "rb"), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    time.sleep(1.0)
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait_batch(c, b.id, timeout=15)
    assert done.status == "cancelled"
    rc = done.request_counts
    assert rc.total == 12 and rc.completed + rc.failed == 12
    errors = [json.loads(l) for l in c.files.content(done.error_file_id).text.splitlines()]
    assert all(e["error"]["code"] == "batch_cancelled" for e in errors)
    assert len(errors) == rc.failed


class Hooks(http.server.BaseHTTPRequestHandler):
    got: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        Hooks.got.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_an_async_request_webhook_verifies_with_standardwebhooks(router):
    base, mint, whsec = router()
    Hooks.got = []
    server = http.server.HTTPServer(("127.0.0.1", 0), Hooks)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        token = mint("acme")
        hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
        r = httpx.post(f"{base}/v1/chat/completions", headers={
            "authorization": f"Bearer {token}", "prefer": "respond-async",
            "x-edgeroute-webhook": hook, "idempotency-key": "py-1",
        }, json={"model": "sim-llama", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 202, r.text
        job = r.json()["id"]
        deadline = time.time() + 20
        while not Hooks.got:
            assert time.time() < deadline, "no webhook"
            time.sleep(0.1)
        headers, body = Hooks.got[0]
        event = Webhook(whsec).verify(body, {k.lower(): v for k, v in headers.items()})
        assert event["type"] == "async_request.completed" and event["data"]["id"] == job
        # A tampered body does not verify.
        with pytest.raises(Exception):
            Webhook(whsec).verify(body.replace(b"completed", b"failed"), {k.lower(): v for k, v in headers.items()})
        polled = httpx.get(f"{base}/v1/async/{job}", headers={"authorization": f"Bearer {token}"}).json()
        assert polled["status"] == "completed" and polled["response"]["status_code"] == 200
    finally:
        server.shutdown()
