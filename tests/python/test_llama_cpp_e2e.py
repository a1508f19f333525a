"""End to end against a real third-party server: llama.cpp (llama-cpp-python) serving
SmolLM2-135M-Instruct behind the edgeroute gateway, called with the official `openai` client."""

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest

from conftest import GGUF, free_port

MSGS = [{"role": "user", "content": "Name one city in Canada."}]


def backend(url):
    return (f'[backend]\nkind = "openai"\nurl = "{url}"\nfirst_byte_timeout_ms = 60000\n'
            f'[[backend.models]]\nid = "smollm2"\nmemory_mb = 120\n')


def test_gateway_serves_llama_cpp_json_and_stream(llama_server, start_node):
    base, mint, _ = start_node(backend(llama_server))
    via = openai.OpenAI(base_url=f"{base}/v1", api_key=mint(), max_retries=0, timeout=120)
    direct = openai.OpenAI(base_url=f"{llama_server}/v1", api_key="unused", max_retries=0, timeout=120)

    args = dict(model="smollm2", messages=MSGS, max_tokens=24, temperature=0, seed=1)
    want = direct.chat.completions.create(**args)
    got = via.chat.completions.with_raw_response.create(**args)
    assert got.headers["x-edgeroute-node"] == "py-node"
    got = got.parse()
    assert got.choices[0].message.content, "empty answer from the real model"
    assert got.choices[0].message.content == want.choices[0].message.content, "greedy output changed through the gateway"
    assert got.choices[0].finish_reason in ("stop", "length")
    assert got.usage.completion_tokens == want.usage.completion_tokens

    chunks = list(via.chat.completions.create(**args, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == want.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")

    health = httpx.get(f"{base}/health").json()
    assert health["requests_in_window"] == 2 and health["error_rate"] == 0.0
    assert health["ttft_ms"]["p50"] > 0


def test_llama_cpp_client_errors_pass_through(llama_server, start_node):
    base, mint, _ = start_node(backend(llama_server))
    via = openai.OpenAI(base_url=f"{base}/v1", api_key=mint(), max_retries=0, timeout=120)
    # A prompt far beyond n_ctx=2048: llama.cpp refuses it; the gateway passes the 4xx through
    # and does not count it against the node.
    long = [{"role": "user", "content": "word " * 6000}]
    try:
        via.chat.completions.create(model="smollm2", messages=long, max_tokens=4)
    except openai.BadRequestError as e:
        assert e.status_code == 400
    else:
        raise AssertionError("expected a 400 for an over-long prompt")
    assert httpx.get(f"{base}/health").json()["error_rate"] == 0.0


# --- Continuing a cut answer on llama.cpp ------------------------------------------------------
#
# llama.cpp's server does not take `continue_final_message`: it would answer a trailing assistant
# message with a new turn. A node configured with `continuation = "template"` renders the model's
# chat template (read from the GGUF) up to the partial answer and continues it through
# `/v1/completions`. With greedy decoding, the partial answer plus its continuation must be the
# answer the model gives uncut.

STORY = [{"role": "user", "content": "Describe Toronto in three sentences."}]
GREEDY = dict(temperature=0, seed=1)
CONTINUE = {"continue_final_message": True, "add_generation_prompt": False}
# llama.cpp's server applies repeat_penalty 1.1 by default, over the tokens it generated: a
# continuation's partial answer is prompt to it, so the penalty's history restarts at the cut and
# the rest of the answer may be worded differently (as with OpenAI's presence/frequency
# penalties on any backend). With no penalty, greedy decoding must give back the uncut answer
# exactly.
EXACT = {"repeat_penalty": 1.0}


def template_backend(url):
    # `repeat_penalty` is llama.cpp's own knob: the node forwards it only because it is listed.
    return (backend(url).replace("[[backend.models]]", 'extra_fields = ["repeat_penalty"]\n[[backend.models]]')
            + f'continuation = "template"\nchat_template = "{GGUF}"\n')


def stream_text(client, **kw):
    chunks = list(client.chat.completions.create(stream=True, **kw))
    texts = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return texts, finishes


@pytest.fixture(scope="module")
def uncut(llama_server):
    """The model's whole greedy answer, token by token, straight from llama.cpp."""
    direct = openai.OpenAI(base_url=f"{llama_server}/v1", api_key="unused", max_retries=0, timeout=120)
    texts, finishes = stream_text(direct, model="smollm2", messages=STORY, max_tokens=160,
                                  extra_body=EXACT, **GREEDY)
    assert finishes == ["stop"], "the prompt must finish on its own, not on max_tokens"
    assert len([t for t in texts if t]) > 24, texts
    return texts


@pytest.mark.parametrize("cut", [1, 4, 11, 23])
def test_a_node_continues_a_partial_answer_on_llama_cpp(llama_server, start_node, uncut, cut):
    base, mint, _ = start_node(template_backend(llama_server))
    via = openai.OpenAI(base_url=f"{base}/v1", api_key=mint(), max_retries=0, timeout=120)
    whole = "".join(uncut)
    partial = "".join(uncut[:cut + 1])  # the first chunk carries only the role
    msgs = STORY + [{"role": "assistant", "content": partial}]
    texts, finishes = stream_text(via, model="smollm2", messages=msgs, max_tokens=160,
                                  extra_body={**EXACT, **CONTINUE}, **GREEDY)
    assert partial + "".join(texts) == whole
    assert finishes == ["stop"]
    answer = via.chat.completions.create(model="smollm2", messages=msgs, max_tokens=160,
                                         extra_body={**EXACT, **CONTINUE}, **GREEDY)
    assert answer.object == "chat.completion" and answer.model == "smollm2"
    assert partial + answer.choices[0].message.content == whole
    assert answer.choices[0].finish_reason == "stop"


def test_with_llama_cpps_default_penalty_the_continuation_still_reads_on(llama_server, start_node):
    base, mint, _ = start_node(template_backend(llama_server))
    via = openai.OpenAI(base_url=f"{base}/v1", api_key=mint(), max_retries=0, timeout=120)
    uncut, _ = stream_text(via, model="smollm2", messages=STORY, max_tokens=160, **GREEDY)
    partial = "".join(uncut[:5])
    msgs = STORY + [{"role": "assistant", "content": partial}]
    texts, finishes = stream_text(via, model="smollm2", messages=msgs, max_tokens=160,
                                  extra_body=CONTINUE, **GREEDY)
    # The same sentence goes on (the next words are the uncut answer's), then the wording may
    # drift where the penalty's history differs; it is one answer, finished once.
    assert "".join(texts).startswith("".join(uncut[5:12]))
    assert finishes == ["stop"]


def test_without_the_template_llama_cpp_starts_a_new_turn(llama_server, start_node, uncut):
    """Why the template path exists: forwarded as is, the request is answered afresh."""
    base, mint, _ = start_node(backend(llama_server))
    via = openai.OpenAI(base_url=f"{base}/v1", api_key=mint(), max_retries=0, timeout=120)
    partial = "".join(uncut[:5])
    msgs = STORY + [{"role": "assistant", "content": partial}]
    texts, _ = stream_text(via, model="smollm2", messages=msgs, max_tokens=160,
                           extra_body={**EXACT, **CONTINUE}, **GREEDY)
    assert partial + "".join(texts) != "".join(uncut)


class CuttingUpstream:
    """A pass-through to llama.cpp that cuts every fresh answer after `after` chunks (the
    connection closes with no `[DONE]`), and lets continuations through whole."""

    def __init__(self, target: str, after: int):
        self.cuts = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *a):
                pass

            def do_GET(self):
                r = httpx.get(target + self.path, timeout=30)
                self.send_response(r.status_code)
                self.send_header("content-type", r.headers.get("content-type", "application/json"))
                self.end_headers()
                self.wfile.write(r.content)

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                req = json.loads(body)
                fresh = self.path.endswith("/chat/completions") and req["messages"][-1]["role"] != "assistant"
                with httpx.stream("POST", target + self.path, content=body, timeout=120,
                                  headers={"content-type": "application/json"}) as r:
                    self.send_response(r.status_code)
                    self.send_header("content-type", r.headers.get("content-type", "application/json"))
                    self.end_headers()
                    events = 0
                    for line in r.iter_lines():
                        self.wfile.write((line + "\n").encode())
                        if line.startswith("data: ") and req.get("stream"):
                            events += 1
                            if fresh and events == after:
                                self.wfile.flush()
                                outer.cuts += 1
                                self.connection.shutdown(socket.SHUT_RDWR)
                                return
                    self.wfile.flush()

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def test_the_sdk_continues_a_cut_llama_cpp_answer_on_another_node(
        llama_server, start_node, start_discovery_and_proxy, uncut):
    cutter = CuttingUpstream(llama_server, after=8)
    try:
        a, mint, _ = start_node(template_backend(cutter.url), node_id="tor-1", region="toronto")
        b, _, _ = start_node(template_backend(cutter.url), node_id="tor-2", region="toronto")
        base = start_discovery_and_proxy(
            [("tor-1", a, "toronto"), ("tor-2", b, "toronto")], "smollm2", mint(),
            ["--first-token-timeout-ms", "60000", "--stall-timeout-ms", "30000", "--hedge-after-ms", "60000"])
        proxy = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=120)
        texts, finishes = stream_text(proxy, model="smollm2", messages=STORY, max_tokens=160,
                                      extra_body=EXACT, extra_headers={"x-edgeroute-session": "voice-1"},
                                      **GREEDY)
        assert cutter.cuts == 1, "the pinned node's answer was cut once"
        assert "".join(texts) == "".join(uncut), "one coherent answer: nothing lost, nothing repeated"
        assert finishes == ["stop"]
        metrics = httpx.get(f"{base}/metrics").text
        assert "edgeroute_client_failovers_total 1" in metrics, metrics
    finally:
        cutter.close()
