"""The local proxy is not a web page's tool (issue 14). `edgeroute proxy` holds the user's
token, so what a browser tab can send it — a CORS "simple" cross-site POST (text/plain, with
the page's Origin), a DNS-rebinding request (Host: the attacker's name) — is refused before it
reaches the fleet, while a program on this machine (loopback Host, JSON, no Origin) is served.
The token is read from a file, so it is not in the process's command line (`ps`)."""

import os
import subprocess
from pathlib import Path

import httpx
import openai

from conftest import free_port, wait_http
from test_proxy import fleet


def cross_site_post(base: str, **headers) -> httpx.Response:
    """What an HTML form or `fetch(url, {mode: "no-cors", method: "POST"})` on another site
    sends: no preflight, a text/plain body that happens to be JSON."""
    body = '{"model":"sim-llama","max_tokens":2,"messages":[{"role":"user","content":"hi"}]}'
    h = {"Content-Type": "text/plain;charset=UTF-8", "Origin": "https://evil.example",
         "Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}
    h.update(headers)
    return httpx.post(f"{base}/v1/chat/completions", content=body,
                      headers={k: v for k, v in h.items() if v is not None}, timeout=10)


def chats_served(base: str) -> int:
    """Requests the SDK sent to nodes: the proxy's own counters (sessions pinned)."""
    metrics = httpx.get(f"{base}/metrics", timeout=10).text
    line = next(l for l in metrics.splitlines() if l.startswith("edgeroute_client_sessions_total"))
    return int(line.split()[-1])


def test_a_cross_site_post_to_the_real_proxy_is_refused(start_node, start_discovery_and_proxy):
    proxy, _, _, _ = fleet(start_node, start_discovery_and_proxy)
    base = str(proxy.base_url).removesuffix("/v1/").removesuffix("/v1")
    before = chats_served(base)

    r = cross_site_post(base)
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "origin_not_allowed"
    assert r.headers["content-type"].startswith("application/json")

    # The same form post from an opaque origin (sandboxed iframe, file://).
    assert cross_site_post(base, Origin="null").status_code == 403
    # With every browser marker stripped, the text/plain body alone is refused.
    r = cross_site_post(base, Origin=None, **{"Sec-Fetch-Site": None, "Sec-Fetch-Mode": None})
    assert r.status_code == 415, r.text
    assert r.json()["error"]["code"] == "unsupported_media_type"
    # DNS rebinding: the page's own name, now resolving to 127.0.0.1; JSON, no Origin.
    port = base.rsplit(":", 1)[1]
    r = httpx.post(f"{base}/v1/chat/completions", headers={"Host": f"evil.example:{port}"},
                   json={"model": "sim-llama", "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]}, timeout=10)
    assert r.status_code == 421, r.text
    assert r.json()["error"]["code"] == "host_not_allowed"
    # A CORS preflight fails, so no non-simple request is ever sent by a browser.
    r = httpx.options(f"{base}/v1/chat/completions", timeout=10,
                      headers={"Origin": "https://evil.example",
                               "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403
    assert "access-control-allow-origin" not in r.headers

    # A page's WebSocket to the realtime route (browsers always send Origin on an upgrade).
    r = httpx.get(f"{base}/v1/realtime?model=sim-llama", timeout=10,
                  headers={"Origin": "https://evil.example", "Connection": "Upgrade",
                           "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="})
    assert r.status_code == 403, r.text
    assert r.json()["error"]["code"] == "origin_not_allowed"

    assert chats_served(base) == before, "a refused request started a session on the fleet"

    # The program on this machine is served: the official client (JSON, loopback, no Origin).
    answer = proxy.chat.completions.create(model="sim-llama", max_tokens=4,
                                           messages=[{"role": "user", "content": "hi"}])
    assert answer.choices[0].message.content


def test_the_token_is_not_on_the_command_line(edgeroute_bin, workdir):
    token = "py-proxy-secret-" + os.urandom(12).hex()
    # The proxy as a user runs it: the token in a file, the file's path on the command line.
    token_file = workdir / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    port = free_port()
    log = open(workdir / "proxy-cmdline.log", "wb")
    p = subprocess.Popen([edgeroute_bin, "proxy", "--listen", f"127.0.0.1:{port}",
                          "--discovery", "http://127.0.0.1:9", "--token-file", str(token_file)],
                         stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/health", 30, p)
        cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes()
        assert str(token_file).encode() in cmdline
        assert token.encode() not in cmdline, "the token is visible in ps"
        ps = subprocess.run(["ps", "-ww", "-o", "args=", "-p", str(p.pid)],
                            capture_output=True, text=True).stdout
        assert "--token-file" in ps and token not in ps
    finally:
        p.terminate()
        p.wait(10)
        log.close()

    # A token given on the command line is refused with a pointer to the file or environment.
    out = subprocess.run([edgeroute_bin, "proxy", "--listen", "127.0.0.1:0",
                          "--discovery", "http://127.0.0.1:9", "--token", token],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode != 0
    assert "--token-file" in out.stderr and "EDGEROUTE_TOKEN" in out.stderr, out.stderr
    assert token not in out.stderr + out.stdout, "the refusal echoes the token"

    # A plaintext discovery URL on a host that is not loopback is refused at start: the token
    # would cross the network in clear text.
    env = {k: v for k, v in os.environ.items() if k != "EDGEROUTE_TOKEN"}
    out = subprocess.run([edgeroute_bin, "proxy", "--listen", "127.0.0.1:0",
                          "--discovery", "http://10.255.255.1:7070", "--token-file", str(token_file)],
                         capture_output=True, text=True, timeout=30, env=env)
    assert out.returncode != 0
    assert "plaintext" in out.stderr and token not in out.stderr, out.stderr
