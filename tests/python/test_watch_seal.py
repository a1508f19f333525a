"""The real binary's sealing path end to end: `edgeroute model seal` signs a Triton model
directory with an operator's Ed25519 key (made by openssl, as an operator would), and
`edgeroute watch` installs only what that key sealed and nobody altered since."""

import subprocess
import time
from pathlib import Path

from conftest import Proc


def openssl_ed25519(workdir: Path) -> tuple[Path, Path]:
    private, public = workdir / "seal.pem", workdir / "seal.pub.pem"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(private)],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "pkey", "-in", str(private), "-pubout", "-out", str(public)],
                   check=True, capture_output=True)
    return private, public


def triton_model(root: Path, name: str) -> Path:
    d = root / name
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.onnx").write_bytes(b"\x07" * 4096)
    (d / "config.pbtxt").write_text(f'name: "{name}"\nplatform: "onnxruntime_onnx"\n')
    return d


def seal(edgeroute_bin: str, d: Path, key: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [edgeroute_bin, "model", "seal", "--dir", str(d), "--model", d.name,
         "--key-file", str(key), "--kid", "ops-1"],
        capture_output=True, text=True,
    )


def test_watch_installs_what_the_operator_sealed_and_nothing_else(edgeroute_bin, workdir):
    private, public = openssl_ed25519(workdir)
    staging, shared, repo = workdir / "build", workdir / "shared", workdir / "repo"
    shared.mkdir()
    # Built and sealed outside the shared volume, then moved in, as a pipeline would.
    good = triton_model(staging, "tts-fast")
    tampered = triton_model(staging, "stt-small")
    for d in (good, tampered):
        r = seal(edgeroute_bin, d, private)
        assert r.returncode == 0, r.stderr
        assert (d / ".edgeroute-seal").is_file()
    # Someone with write access to the volume swaps the weights after sealing (same size).
    (tampered / "1" / "model.onnx").write_bytes(b"\x08" * 4096)
    unsealed = triton_model(staging, "llm-raw")
    for d in (good, tampered, unsealed):
        d.rename(shared / d.name)

    # Without a key, watch refuses to start (unless --allow-unsealed says so).
    r = subprocess.run([edgeroute_bin, "watch", "--shared", str(shared), "--repository",
                        str(repo)], capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert "seal" in (r.stderr + r.stdout)

    watch = Proc([edgeroute_bin, "watch", "--shared", str(shared), "--repository", str(repo),
                  "--seal-public-key", f"ops-1={public}", "--settle-ms", "100"],
                 workdir / "watch.log")
    try:
        deadline = time.time() + 20
        while not (repo / "tts-fast" / "1" / "model.onnx").is_file():
            assert watch.p.poll() is None, watch.output()
            assert time.time() < deadline, watch.output()
            time.sleep(0.1)
        time.sleep(1.0)  # the others settled at the same time: give them every chance
        assert not (repo / "stt-small").exists(), "an altered model was installed"
        assert not (repo / "llm-raw").exists(), "an unsealed model was installed"
        assert not any(p.name.startswith(".staging") for p in repo.iterdir())
        log = watch.output()
        assert "stt-small" in log and "llm-raw" in log, log
    finally:
        watch.stop()
