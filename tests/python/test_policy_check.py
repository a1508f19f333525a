"""`edgeroute policy check` end to end: the real binary validates a policy file, and dry-runs a
wider canary against a running discovery replica (with an admin token for the fleet) that
applies the narrower one: the report names the sessions that would move to v2, nothing is
applied, and an inference token is refused."""

import subprocess
import time

import httpx

from conftest import SECRET, free_port

CANARY = """
version = "{version}"
[[models]]
name = "sim-llama"
[[models.versions]]
id = "v1"
[[models.versions]]
id = "v2"
[[rules]]
id = "canary"
match.models = ["sim-llama"]
versions = {{ v1 = {v1}, v2 = {v2} }}
"""


def mint(edgeroute_bin, secret, *args):
    out = subprocess.run([edgeroute_bin, "token", "mint", "--secret-file", str(secret), "--sub", "ops",
                          *args], check=True, capture_output=True, text=True)
    return out.stdout.strip()


def test_a_wider_canary_is_checked_against_the_live_fleet(edgeroute_bin, start_node, start_proc, workdir):
    # py-1 serves v1 (the registry's default for a plain id), py-2 serves v2 (`name:version`).
    base, _mint, _ = start_node('[backend]\nkind = "sim"\n', node_id="py-1", region="toronto")
    base2, _mint2, _ = start_node(
        '[backend]\nkind = "sim"\n[[backend.sim.models]]\nid = "sim-llama:v2"\n',
        node_id="py-2", region="montreal")
    secret = workdir / "secret"
    live = workdir / "live.toml"
    live.write_text(CANARY.format(version="p1", v1=95, v2=5))
    dport = free_port()
    cfg = workdir / "discovery.toml"
    cfg.write_text(
        f'[discovery]\nlisten = "127.0.0.1:{dport}"\n[auth]\nhs256_secret_file = "{secret}"\n'
        f'[probe]\ninterval_ms = 200\ntimeout_ms = 150\n[policy]\nfile = "{live}"\n'
        f'[[nodes]]\nid = "py-1"\nurl = "{base}"\nregion = "toronto"\n'
        f'[[nodes]]\nid = "py-2"\nurl = "{base2}"\nregion = "montreal"\n')
    start_proc(["discovery", "--config", str(cfg)], f"http://127.0.0.1:{dport}/health", "discovery")
    admin = workdir / "admin.jwt"
    admin.write_text(mint(edgeroute_bin, secret, "--scope", "admin", "--fleet"))
    admin.chmod(0o600)
    nodes_url = f"http://127.0.0.1:{dport}/v1/nodes"
    deadline = time.time() + 10
    while sum(n["health"] == "ready" for n in httpx.get(
            nodes_url, headers={"authorization": f"Bearer {admin.read_text()}"}).json()["nodes"]) < 2:
        assert time.time() < deadline, "discovery never verified both nodes"
        time.sleep(0.1)

    wider = workdir / "wider.toml"
    wider.write_text(CANARY.format(version="p2", v1=50, v2=50))
    # Offline: the document alone.
    r = subprocess.run([edgeroute_bin, "policy", "check", str(wider)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "valid — version `p2`" in r.stdout
    # Against the replica: sessions move from v1 to v2, and the replica still applies p1.
    r = subprocess.run([edgeroute_bin, "policy", "check", str(wider), "--discovery",
                        f"http://127.0.0.1:{dport}", "--token-file", str(admin), "--show", "3"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout
    assert "in force: p1" in r.stdout, r.stdout
    assert "sim-llama:v1" in r.stdout and "sim-llama:v2" in r.stdout, r.stdout
    assert httpx.get(f"http://127.0.0.1:{dport}/health").json()["policy"]["version"] == "p1"

    # A broken document is refused with its line, before any network call.
    broken = workdir / "broken.toml"
    broken.write_text("version = ")
    r = subprocess.run([edgeroute_bin, "policy", "check", str(broken)], capture_output=True, text=True)
    assert r.returncode != 0 and "line" in r.stderr, r.stderr

    # An inference token may not run the check.
    inference = workdir / "inference.jwt"
    inference.write_text(mint(edgeroute_bin, secret, "--scope", "inference"))
    r = subprocess.run([edgeroute_bin, "policy", "check", str(wider), "--discovery",
                        f"http://127.0.0.1:{dport}", "--token-file", str(inference)],
                       capture_output=True, text=True)
    assert r.returncode != 0 and "403" in r.stderr, r.stderr
