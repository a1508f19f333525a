"""The local proxy: the official `openai` package, unchanged, gets edgeroute's routing and
mid-stream failover by pointing its base URL at `edgeroute proxy`."""

import httpx
import openai


def sim(ttft_ms: int) -> str:
    return (f'[backend]\nkind = "sim"\n[backend.sim]\nseed = 3\nttft_base_ms = {ttft_ms}\n'
            'prefill_us_per_token = 0\ntokens_per_s = 1000.0\n')


def fleet(start_node, start_discovery_and_proxy):
    """Two nodes (fast `tor-1`, slower `mtl-1`), a discovery replica, a proxy."""
    tor, mint, _ = start_node(sim(5), node_id="tor-1", region="toronto")
    mtl, _, _ = start_node(sim(60), node_id="mtl-1", region="montreal")
    token = mint()
    for base in (tor, mtl):  # each node reports its own TTFT after a few requests
        c = openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0)
        for _ in range(6):
            c.chat.completions.create(model="sim-llama", max_tokens=2,
                                      messages=[{"role": "user", "content": "hi"}])
    base = start_discovery_and_proxy([("tor-1", tor, "toronto"), ("mtl-1", mtl, "montreal")],
                                     "sim-llama", token)
    proxy = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=10)
    return proxy, tor, mtl, mint


def test_any_openai_client_is_routed_to_the_best_node(start_node, start_discovery_and_proxy):
    proxy, _, _, _ = fleet(start_node, start_discovery_and_proxy)
    msgs = [{"role": "user", "content": "Which node is closest to Toronto?"}]
    raw = proxy.chat.completions.with_raw_response.create(model="sim-llama", messages=msgs, max_tokens=12)
    assert raw.headers["x-edgeroute-node"] == "tor-1", "the session is pinned to the fastest node"
    text = raw.parse().choices[0].message.content
    chunks = list(proxy.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=12, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text
    # A client error from the node reaches the client as the same OpenAI exception.
    try:
        proxy.chat.completions.create(model="sim-llama", messages=[], max_tokens=2)
        raise AssertionError("an empty conversation must be refused")
    except openai.BadRequestError:
        pass


def test_a_stream_cut_on_the_pinned_node_reads_as_one_answer(start_node, start_discovery_and_proxy):
    proxy, tor, mtl, mint = fleet(start_node, start_discovery_and_proxy)
    msgs = [{"role": "user", "content": "Tell me about the weather in Montreal this week."}]
    direct = openai.OpenAI(base_url=f"{mtl}/v1", api_key=mint(), max_retries=0)
    want = direct.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=40).choices[0].message.content
    # Pin a session to tor-1, then make tor-1 cut every stream after 5 tokens.
    proxy.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=2,
                                  extra_headers={"x-edgeroute-session": "s1"})
    r = httpx.put(f"{tor}/admin/faults", json={"cut_after_tokens": 5},
                  headers={"authorization": f"Bearer {mint(scope='admin')}"})
    assert r.status_code == 200, r.text
    chunks = list(proxy.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=40, stream=True,
                                                extra_headers={"x-edgeroute-session": "s1"}))
    got = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert got == want, "no token lost or repeated across the failover"
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1
    # The cut really happened: the session now lives on the node that finished the answer.
    raw = proxy.chat.completions.with_raw_response.create(
        model="sim-llama", messages=msgs, max_tokens=2, extra_headers={"x-edgeroute-session": "s1"})
    assert raw.headers["x-edgeroute-node"] == "mtl-1"
    # The proxy reports the SDK's decisions.
    metrics = httpx.get(str(proxy.base_url).replace("/v1/", "/metrics")).text
    assert "edgeroute_client_failovers_total 1" in metrics, metrics
