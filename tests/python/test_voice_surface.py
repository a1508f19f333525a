"""The official `openai` client on the voice surface of a node (issue 19): speech-to-text,
text-to-speech streamed, embeddings — on the simulator backend, and through a node whose
backend is an OpenAI-compatible upstream (a second process: `edgeroute sim`)."""

import base64
import io
import time
import struct
import wave

import httpx
import openai
import pytest

from conftest import free_port, wait_http

VOICE = (
    '[backend]\nkind = "sim"\n[backend.sim]\nseed = 7\n'
    '[[backend.sim.gpus]]\nid = "gpu0"\nslots = 4\n'
    '[[backend.sim.gpus]]\nid = "gpu1"\nslots = 4\n'
    '[[backend.sim.gpus]]\nid = "gpu2"\nslots = 4\n'
    '[[backend.sim.models]]\nid = "sim-whisper"\ngpu = "gpu0"\n'
    '[[backend.sim.models]]\nid = "sim-llama"\ngpu = "gpu1"\n'
    '[[backend.sim.models]]\nid = "sim-tts"\ngpu = "gpu2"\n'
)


def client(base, token):
    return openai.OpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0, timeout=20)


def wav_bytes(seconds: float, rate: int = 16000) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        n = int(seconds * rate)
        w.writeframes(struct.pack(f"<{n}h", *((i * 37) % 2000 - 1000 for i in range(n))))
    return buf.getvalue()


def check_surface(base, token):
    c = client(base, token)
    audio = wav_bytes(3.0)
    t = c.audio.transcriptions.create(model="sim-whisper", file=("turn.wav", audio))
    assert t.text.strip(), "a transcript"
    again = c.audio.transcriptions.create(model="sim-whisper", file=("turn.wav", audio))
    assert again.text == t.text, "the simulator is deterministic"
    verbose = c.audio.transcriptions.create(
        model="sim-whisper", file=("turn.wav", audio), response_format="verbose_json")
    assert abs(verbose.duration - 3.0) < 0.01 and verbose.segments
    text = c.audio.transcriptions.create(
        model="sim-whisper", file=("turn.wav", audio), response_format="text")
    assert isinstance(text, str) and text.strip() == t.text.strip()
    tr = c.audio.translations.create(model="sim-whisper", file=("turn.wav", audio))
    assert tr.text.strip()
    # Streamed: the words as server-sent events as they are decoded, then the whole.
    events = list(c.audio.transcriptions.create(model="sim-whisper", file=("turn.wav", audio),
                                                stream=True))
    deltas = [e.delta for e in events if e.type == "transcript.text.delta"]
    assert len(deltas) > 1 and "".join(deltas) == t.text
    assert events[-1].type == "transcript.text.done" and events[-1].text == t.text

    chunks = []
    with c.audio.speech.with_streaming_response.create(
            model="sim-tts", voice="alloy", input="Hello from Toronto. The weather is fine.",
            response_format="wav") as r:
        assert r.headers["content-type"].startswith("audio/wav")
        for chunk in r.iter_bytes():
            chunks.append(chunk)
    body = b"".join(chunks)
    with wave.open(io.BytesIO(body), "rb") as w:
        assert w.getnframes() > 0 and w.getsampwidth() == 2
        seconds = w.getnframes() / w.getframerate()
    assert 1.0 < seconds < 10.0, seconds

    e = c.embeddings.create(model="sim-llama", input=["hello", "world", "hello"])
    vecs = [d.embedding for d in e.data]
    assert len(vecs) == 3 and vecs[0] == vecs[2] and vecs[0] != vecs[1]
    assert abs(sum(x * x for x in vecs[0]) - 1.0) < 1e-3
    done = c.completions.create(model="sim-llama", prompt="Once upon a time", max_tokens=8)
    assert done.object == "text_completion" and done.usage.completion_tokens == 8
    streamed = list(c.completions.create(model="sim-llama", prompt="Once upon a time",
                                         max_tokens=8, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == done.choices[0].text
    b64 = c.embeddings.create(model="sim-llama", input="hello", encoding_format="base64")
    raw = base64.b64decode(b64.data[0].embedding)
    floats = struct.unpack(f"<{len(raw) // 4}f", raw)
    assert [round(x, 5) for x in floats] == [round(x, 5) for x in vecs[0]]


def test_the_voice_surface_on_the_simulator(start_node):
    base, mint, _ = start_node(VOICE)
    check_surface(base, mint())


def test_who_may_call_and_bad_input(start_node):
    base, mint, _ = start_node(VOICE)
    with pytest.raises(openai.AuthenticationError):
        client(base, "not-a-jwt").embeddings.create(model="sim-llama", input="x")
    with pytest.raises(openai.NotFoundError) as e:
        client(base, mint()).embeddings.create(model="nope", input="x")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client(base, mint()).audio.speech.create(model="sim-tts", voice="alloy", input="")
    assert e.value.body["param"] == "input"
    # A JSON body where an upload is expected: refused before the body is read.
    r = httpx.post(f"{base}/v1/audio/transcriptions", json={"model": "sim-whisper"},
                   headers={"authorization": f"Bearer {mint()}"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


def test_through_a_node_whose_backend_is_an_openai_compatible_upstream(start_node, edgeroute_bin, tmp_path):
    import subprocess
    port = free_port()
    sim_cfg = tmp_path / "sim.toml"
    sim_cfg.write_text(VOICE.split("[backend.sim]\n", 1)[1].replace("backend.sim.", ""))
    log = open(tmp_path / "sim.log", "wb")
    sim = subprocess.Popen([edgeroute_bin, "sim", "--listen", f"127.0.0.1:{port}", "--config", str(sim_cfg)],
                           stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 20, sim)
        upstream = (
            f'[backend]\nkind = "openai"\nurl = "http://127.0.0.1:{port}"\n'
            '[[backend.models]]\nid = "sim-whisper"\n'
            '[[backend.models]]\nid = "sim-llama"\n'
            '[[backend.models]]\nid = "sim-tts"\n'
        )
        base, mint, _ = start_node(upstream)
        check_surface(base, mint())
    finally:
        sim.terminate()
        sim.wait(10)


def test_through_the_proxy_a_node_killed_mid_call_costs_no_call(start_node, start_discovery_and_proxy):
    """Two voice nodes behind discovery and `edgeroute proxy`; the official client talks to
    the proxy. The node serving a long speech request is killed while it streams: the SDK sends
    the request again, whole, to the other node, and the caller gets one complete WAV."""
    import concurrent.futures
    slow = VOICE.replace("seed = 7\n", "seed = 7\nspeech_realtime_factor = 2.0\n")
    a, mint, proc_a = start_node(slow, node_id="tor-1", region="toronto")
    b, _, proc_b = start_node(slow, node_id="tor-2", region="toronto")
    base = start_discovery_and_proxy([("tor-1", a, "toronto"), ("tor-2", b, "toronto")],
                                     "sim-tts", mint())
    proxy = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=30)
    session = {"x-edgeroute-session": "voice-1"}
    t = proxy.audio.transcriptions.with_raw_response.create(
        model="sim-whisper", file=("turn.wav", wav_bytes(2.0)), extra_headers=session)
    assert t.parse().text.strip()
    e = proxy.embeddings.create(model="sim-llama", input=["a", "b"], extra_headers=session)
    assert len(e.data) == 2

    def speak():
        r = proxy.audio.speech.with_raw_response.create(
            model="sim-tts", voice="alloy", input="One sentence after another. " * 6,
            response_format="wav", extra_headers=session)
        return r.headers["x-edgeroute-node"], r.content

    first_node, _ = speak()
    procs = {"tor-1": proc_a, "tor-2": proc_b}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(speak)
        time.sleep(0.3)  # the pinned node is producing audio now
        procs[first_node].p.kill()
        node, audio = pending.result(timeout=60)
    assert node != first_node, "answered by the other node"
    with wave.open(io.BytesIO(audio), "rb") as w:
        assert w.getnframes() > 0
    # And the next calls of the session go to the survivor.
    t = proxy.audio.transcriptions.with_raw_response.create(
        model="sim-whisper", file=("turn.wav", wav_bytes(1.0)), extra_headers=session)
    assert t.headers["x-edgeroute-node"] == node and t.parse().text.strip()
