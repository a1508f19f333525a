"""The official `openai` Python package as a real client of the edgeroute gateway."""

import httpx
import openai
import pytest

SIM = '[backend]\nkind = "sim"\n[backend.sim]\nseed = 3\nttft_base_ms = 5\ntokens_per_s = 500.0\n'


def client(base, token, **kw):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=10, **kw)


def test_chat_json_and_stream_agree(start_node):
    base, mint, _ = start_node(SIM)
    c = client(base, mint())
    msgs = [{"role": "user", "content": "Which node is closest to Toronto?"}]

    full = c.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=12)
    assert full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant"
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12
    assert full.usage.total_tokens == full.usage.prompt_tokens + 12
    text = full.choices[0].message.content
    assert text and len(text.split()) == 12

    chunks = list(c.chat.completions.create(
        model="sim-llama", messages=msgs, max_tokens=12, stream=True,
        stream_options={"include_usage": True}))
    streamed = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert streamed == text, "the simulator is deterministic: stream and JSON must match"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_headers_reach_the_client(start_node):
    base, mint, _ = start_node(SIM)
    raw = client(base, mint()).chat.completions.with_raw_response.create(
        model="sim-llama", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert raw.headers["x-edgeroute-node"] == "py-node"
    assert "q=" in raw.headers["x-edgeroute-load"]
    assert raw.parse().usage.completion_tokens == 2


def test_errors_map_to_openai_exceptions(start_node):
    base, mint, _ = start_node(SIM, '[limits]\nrate_limit_per_s = 1\nrate_limit_burst = 1\n')
    c = client(base, mint())
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        client(base, "not-a-jwt").chat.completions.create(model="sim-llama", messages=[{"role": "user", "content": "x"}])
    # The 1-request burst is now spent by the 404 above (rate limiting precedes routing).
    with pytest.raises(openai.RateLimitError) as e:
        c.chat.completions.create(model="sim-llama", messages=[{"role": "user", "content": "x"}])
    assert int(e.value.response.headers["retry-after"]) >= 1
    # Bad input is a 400 naming the parameter.
    base2, mint2, _ = start_node(SIM)
    with pytest.raises(openai.BadRequestError) as e:
        client(base2, mint2()).chat.completions.create(model="sim-llama", messages=[])
    assert e.value.body["param"] == "messages"


def test_models_list(start_node):
    base, mint, _ = start_node(SIM)
    models = client(base, mint()).models.list()
    ids = [m.id for m in models.data]
    assert ids == ["sim-llama"]


def test_stream_error_after_tokens_raises_in_the_client(start_node):
    base, mint, _ = start_node(SIM + '[backend.sim.faults]\ncut_after_tokens = 3\n')
    c = client(base, mint())
    got = []
    with pytest.raises(openai.APIError):
        for ch in c.chat.completions.create(model="sim-llama", stream=True,
                                            messages=[{"role": "user", "content": "x"}]):
            if ch.choices:
                got.append(ch.choices[0].delta.content or "")
    assert len("".join(got).split()) == 3, "tokens before the cut arrive, then the client sees an error"
