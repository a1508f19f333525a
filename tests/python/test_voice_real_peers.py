"""Real speech engines behind a node (issue 19): Piper speaks, PocketSphinx listens
(`voice_peer.py`, their models from PyPI packages), the official `openai` client talks to the
node. A voice turn's two ends, for real: the node's speech answer, streamed, is transcribed
back through the node and says what was asked; the time to first audio is the node's figure."""

import io
import subprocess
import sys
import time
import wave
from pathlib import Path

import httpx
import openai
import pytest

from conftest import free_port, wait_http

TEXT = "Hello world. The weather in Toronto is fine today. See you soon."


@pytest.fixture
def voice_peer(tmp_path):
    port = free_port()
    log = open(tmp_path / "voice-peer.log", "wb")
    peer = Path(__file__).with_name("voice_peer.py")
    p = subprocess.Popen([sys.executable, str(peer), "--port", str(port)],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 60, p)
        yield f"http://127.0.0.1:{port}"
    finally:
        p.terminate()
        p.wait(10)


def as_wav(streamed: bytes) -> bytes:
    """A streamed WAV (its header says 'unknown length') as a file with its real sizes."""
    rate = int.from_bytes(streamed[24:28], "little")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(streamed[44:])
    return buf.getvalue()


def test_piper_speaks_and_pocketsphinx_hears_it_through_a_node(voice_peer, start_node):
    backend = (f'[backend]\nkind = "openai"\nurl = "{voice_peer}"\nfirst_byte_timeout_ms = 60000\n'
               'request_timeout_ms = 120000\n'
               '[[backend.models]]\nid = "piper-joe"\n[[backend.models]]\nid = "pocketsphinx-en"\n')
    base, mint, _ = start_node(backend)
    c = openai.OpenAI(base_url=f"{base}/v1", api_key=mint(), max_retries=0, timeout=120)

    started = time.monotonic()
    first_audio = None
    chunks = []
    with c.audio.speech.with_streaming_response.create(
            model="piper-joe", voice="joe", input=TEXT, response_format="wav") as r:
        assert r.headers["content-type"] == "audio/wav"
        assert r.headers["x-edgeroute-node"] == "py-node"
        for chunk in r.iter_bytes():
            if first_audio is None and chunk:
                first_audio = time.monotonic() - started
            chunks.append(chunk)
    total = time.monotonic() - started
    audio = b"".join(chunks)
    assert audio[:4] == b"RIFF" and len(audio) > 44 + 22050, "at least a second of speech"
    assert first_audio is not None and first_audio < total, (first_audio, total)

    heard = c.audio.transcriptions.create(model="pocketsphinx-en", file=("turn.wav", as_wav(audio)))
    words = heard.text.lower().split()
    assert "toronto" in words and "weather" in words, heard.text

    m = httpx.get(f"{base}/metrics").text
    assert 'edgeroute_node_first_byte_seconds_count{route="speech"} 1' in m, m
    assert 'edgeroute_node_first_byte_seconds_count{route="transcriptions"} 1' in m
