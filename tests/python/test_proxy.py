"""The local proxy: the official `openai` package, unchanged, gets edgeroute's routing and
mid-stream failover by pointing its base URL at `edgeroute proxy`."""

import time

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


def test_streams_name_their_node_and_a_continuation_is_visible(start_node, start_discovery_and_proxy):
    proxy, tor, _, mint = fleet(start_node, start_discovery_and_proxy)
    base = str(proxy.base_url)
    msgs = [{"role": "user", "content": "Tell me about the weather in Toronto this week."}]
    body = {"model": "sim-llama", "messages": msgs, "max_tokens": 30, "stream": True}
    hdrs = {"x-edgeroute-session": "s2"}
    with httpx.stream("POST", f"{base}chat/completions", json=body, headers=hdrs, timeout=10) as r:
        assert r.headers["x-edgeroute-node"] == "tor-1"
        assert "continued" not in r.read().decode()
    r = httpx.put(f"{tor}/admin/faults", json={"cut_after_tokens": 5},
                  headers={"authorization": f"Bearer {mint(scope='admin')}"})
    assert r.status_code == 200, r.text
    with httpx.stream("POST", f"{base}chat/completions", json=body, headers=hdrs, timeout=10) as r:
        text = r.read().decode()
    assert ": edgeroute continued from=tor-1 to=mtl-1 after_tokens=5" in text, text
    assert text.rstrip().endswith("data: [DONE]")


def test_a_session_header_that_is_not_a_token_is_refused(start_node, start_discovery_and_proxy):
    proxy, _, _, _ = fleet(start_node, start_discovery_and_proxy)
    msgs = [{"role": "user", "content": "hi"}]
    for bad in ("has space", "x" * 200):
        try:
            proxy.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=2,
                                          extra_headers={"x-edgeroute-session": bad})
            raise AssertionError(f"{bad!r} must be refused")
        except openai.BadRequestError as e:
            assert e.body["code"] == "invalid_header", e.body


def test_parallel_turns_without_a_session_header_run_concurrently(start_node, start_discovery_and_proxy):
    """Six turns at once through one (header-less) session take about as long as one: the
    proxy never serialises its callers. Each answer is 80 tokens at 200/s (~400 ms)."""
    import concurrent.futures

    slow = ('[backend]\nkind = "sim"\n[backend.sim]\nseed = 3\nttft_base_ms = 5\nprefill_us_per_token = 0\n'
            'tokens_per_s = 200.0\nmin_answer_tokens = 80\nmax_answer_tokens = 80\n'
            '[[backend.sim.gpus]]\nid = "gpu0"\nslots = 8\n')
    tor, mint, _ = start_node(slow, node_id="tor-1", region="toronto")
    mtl, _, _ = start_node(slow, node_id="mtl-1", region="montreal")
    base = start_discovery_and_proxy([("tor-1", tor, "toronto"), ("mtl-1", mtl, "montreal")],
                                     "sim-llama", mint())
    proxy = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    msgs = [{"role": "user", "content": "Count slowly."}]

    def turn(_=None):
        t = time.monotonic()
        proxy.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=80)
        return time.monotonic() - t

    turn()  # the session starts (discovery, probes)
    one = min(turn() for _ in range(2))
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        t = time.monotonic()
        list(pool.map(turn, range(6)))
        six = time.monotonic() - t
    print(f"one turn {one * 1000:.0f} ms, six parallel {six * 1000:.0f} ms ({six / one:.2f}x)")
    assert six <= 1.5 * one, f"six parallel turns took {six:.2f} s, one {one:.2f} s"


def test_a_model_unloaded_under_a_pinned_session_costs_no_error(start_node, start_discovery_and_proxy):
    """An operator frees the LLM on the node a session is pinned to; that session's next turn
    and a new session started right after both answer, from another node."""
    proxy, tor, _, mint = fleet(start_node, start_discovery_and_proxy)
    msgs = [{"role": "user", "content": "hello"}]
    hdrs = {"x-edgeroute-session": "call-7"}
    raw = proxy.chat.completions.with_raw_response.create(model="sim-llama", messages=msgs, max_tokens=4,
                                                          extra_headers=hdrs)
    assert raw.headers["x-edgeroute-node"] == "tor-1"
    r = httpx.post(f"{tor}/v1/models/unload", json={"model": "sim-llama"},
                   headers={"authorization": f"Bearer {mint(scope='admin')}"})
    assert r.status_code < 300, r.text
    for _ in range(3):
        raw = proxy.chat.completions.with_raw_response.create(model="sim-llama", messages=msgs, max_tokens=4,
                                                              extra_headers=hdrs)
        assert raw.parse().choices[0].message.content
    assert raw.headers["x-edgeroute-node"] == "mtl-1"
    chunks = list(proxy.chat.completions.create(model="sim-llama", messages=msgs, max_tokens=4, stream=True,
                                                extra_headers={"x-edgeroute-session": "call-8"}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
