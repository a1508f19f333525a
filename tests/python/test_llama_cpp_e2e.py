"""End to end against a real third-party server: llama.cpp (llama-cpp-python) serving
SmolLM2-135M-Instruct behind the edgeroute gateway, called with the official `openai` client."""

import httpx
import openai

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
