"""Fixtures that start real edgeroute processes (and real third-party peers) on loopback.

The `edgeroute` binary comes from $EDGEROUTE_BIN (scripts/test.sh builds it); the llama.cpp
server and its model come from the cache scripts/setup-python.sh fills.
"""

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[2]
SECRET = "python-suite-secret-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError as e:  # not up yet
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


@pytest.fixture(scope="session")
def edgeroute_bin() -> str:
    path = os.environ.get("EDGEROUTE_BIN") or str(ROOT / "target" / "debug" / "edgeroute")
    if not os.path.exists(path):
        pytest.fail(f"edgeroute binary not found at {path}: run scripts/test.sh (it builds it)")
    return path


class Proc:
    """A child process that is always stopped, and whose log is shown when a test fails."""

    def __init__(self, args, log_path: Path, env=None):
        self.log_path = log_path
        self.log = open(log_path, "wb")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self.log.close()

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def workdir():
    d = Path(tempfile.mkdtemp(prefix="edgeroute-py-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def start_node(edgeroute_bin, workdir):
    """Starts `edgeroute node` with the given [backend] section; returns (base_url, mint)."""
    procs = []

    def start(backend_toml: str, limits_toml: str = "", node_id: str = "py-node",
              region: str = "local"):
        port = free_port()
        secret = workdir / "secret"
        secret.write_text(SECRET)
        cfg = workdir / f"node-{port}.toml"
        cfg.write_text(
            f'[node]\nid = "{node_id}"\nregion = "{region}"\nlisten = "127.0.0.1:{port}"\n'
            f'[auth]\nhs256_secret_file = "{secret}"\n{limits_toml}\n{backend_toml}\n'
        )
        proc = Proc([edgeroute_bin, "node", "--config", str(cfg)], workdir / f"node-{port}.log")
        procs.append(proc)
        wait_http(f"http://127.0.0.1:{port}/health", 30, proc.p)

        def mint(sub="py-tenant", scope="inference", ttl=600):
            out = subprocess.run(
                [edgeroute_bin, "token", "mint", "--secret-file", str(secret), "--sub", sub,
                 "--scope", scope, "--ttl", str(ttl)]
                + (["--fleet"] if "admin" in scope.split() else []),
                check=True, capture_output=True, text=True,
            )
            return out.stdout.strip()

        return f"http://127.0.0.1:{port}", mint, proc

    yield start
    for p in procs:
        p.stop()


LLAMA_CACHE = Path(os.environ.get("EDGEROUTE_CACHE", Path.home() / ".cache" / "edgeroute"))
GGUF = LLAMA_CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory):
    """A real llama.cpp server (llama-cpp-python) serving SmolLM2-135M on loopback."""
    if not GGUF.exists():
        pytest.fail(f"{GGUF} missing: scripts/setup-python.sh installs it")
    port = free_port()
    log = tmp_path_factory.mktemp("llama") / "llama.log"
    proc = Proc(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(GGUF), "--model_alias", "smollm2",
         "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "2"],
        log,
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", 120, proc.p)
    except Exception:
        print(proc.output())
        proc.stop()
        raise
    yield f"http://127.0.0.1:{port}"
    proc.stop()


@pytest.fixture
def start_proc(edgeroute_bin, workdir):
    """Starts `edgeroute <args>` and waits for `ready_url`; stops it after the test."""
    procs = []

    def start(args, ready_url: str, name: str):
        proc = Proc([edgeroute_bin, *args], workdir / f"{name}.log")
        procs.append(proc)
        try:
            wait_http(ready_url, 30, proc.p)
        except Exception:
            print(proc.output())
            raise
        return proc

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def start_discovery(start_proc, workdir):
    """A discovery replica over static `nodes` [(id, url, region)], waited for until it has
    verified every node; returns its base URL."""

    def start(nodes, model: str):
        dport = free_port()
        cfg = workdir / "discovery.toml"
        cfg.write_text(
            f'[discovery]\nlisten = "127.0.0.1:{dport}"\nallow_unauthenticated = true\n'
            '[probe]\ninterval_ms = 200\ntimeout_ms = 150\n'
            + "".join(f'[[nodes]]\nid = "{i}"\nurl = "{u}"\nregion = "{r}"\n' for i, u, r in nodes))
        start_proc(["discovery", "--config", str(cfg)], f"http://127.0.0.1:{dport}/health", "discovery")
        deadline = time.time() + 10
        url = f"http://127.0.0.1:{dport}/v1/discover?model={model}&k=5"
        while len(httpx.get(url).json()["candidates"]) < len(nodes):
            assert time.time() < deadline, "discovery never verified every node"
            time.sleep(0.05)
        return f"http://127.0.0.1:{dport}"

    return start


@pytest.fixture
def start_discovery_and_proxy(start_proc, start_discovery, workdir):
    """A discovery replica over static `nodes` [(id, url, region)], verified, and `edgeroute
    proxy` in front of it; returns the proxy's base URL."""

    def start(nodes, model: str, token: str, proxy_args=()):
        discovery = start_discovery(nodes, model)
        pport = free_port()
        token_file = workdir / "proxy-token"  # never on the command line: `ps` shows it
        token_file.write_text(token)
        token_file.chmod(0o600)
        start_proc(["proxy", "--listen", f"127.0.0.1:{pport}", "--discovery", discovery,
                    "--token-file", str(token_file), *proxy_args], f"http://127.0.0.1:{pport}/health", "proxy")
        return f"http://127.0.0.1:{pport}"

    return start
