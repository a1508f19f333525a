"""Every config.pbtxt edgeroute generates for Triton parses with Triton's own protobuf schema.

The entries come from the real binary (`edgeroute model triton-config`, the same conversion
a node runs on `POST /v1/models/load`), and are read back with `model_config_pb2` from the
`tritonclient` wheel — loaded by path, because importing `tritonclient.grpc` needs grpc, which
this suite does not install — through protobuf's strict `text_format.Parse` (an unknown field
or a malformed value is an error)."""

import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
from google.protobuf import text_format


def model_config_pb2():
    spec = importlib.util.find_spec("tritonclient")
    assert spec and spec.submodule_search_locations, "tritonclient is not installed"
    path = Path(list(spec.submodule_search_locations)[0]) / "grpc" / "model_config_pb2.py"
    mod_spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module


PB = model_config_pb2()


def parse(text: str):
    return text_format.Parse(text, PB.ModelConfig())


def snapshot(root: Path, files: dict[str, bytes]) -> Path:
    root.mkdir(parents=True)
    for name, body in files.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(body)
    return root


LLAMA = json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}).encode()


def triton_config(edgeroute_bin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([edgeroute_bin, "model", "triton-config", *args],
                          capture_output=True, text=True, timeout=60)


def test_the_schema_is_strict():
    # The control: were the parse lenient, the tests below would prove nothing.
    parse('name: "m"\nbackend: "vllm"\n')
    with pytest.raises(text_format.ParseError):
        parse('name: "m"\nbakend: "vllm"\n')
    with pytest.raises(text_format.ParseError):
        parse('instance_group [ { kind: KIND_TPU } ]\n')


@pytest.mark.parametrize("gpu", [0, 3])
def test_a_transformer_checkpoint_becomes_a_valid_vllm_entry(edgeroute_bin, workdir, gpu):
    weights = b"\x03" * 4096
    d = snapshot(workdir / "snap", {"config.json": LLAMA, "model.safetensors": weights,
                                    "tokenizer.json": b"{}"})
    repo = workdir / "repo"
    r = triton_config(edgeroute_bin, "--dir", str(d), "--name", "tiny-llama",
                      "--gpu", str(gpu), "--out", str(repo))
    assert r.returncode == 0, r.stderr
    entry = repo / "tiny-llama"
    cfg = parse((entry / "config.pbtxt").read_text())
    assert cfg.name == "tiny-llama"
    assert cfg.backend == "vllm" and cfg.platform == ""
    assert cfg.max_batch_size == 0
    assert cfg.model_transaction_policy.decoupled
    assert [i.name for i in cfg.input][:1] == ["text_input"]
    assert cfg.input[0].data_type == PB.TYPE_STRING and list(cfg.input[0].dims) == [1]
    assert [o.name for o in cfg.output] == ["text_output"]
    assert len(cfg.instance_group) == 1
    group = cfg.instance_group[0]
    assert group.kind == PB.ModelInstanceGroup.KIND_GPU
    assert group.count == 1 and list(group.gpus) == [gpu]
    # vLLM's engine arguments name the weights by their absolute path in the repository.
    args = json.loads((entry / "1" / "model.json").read_text())
    assert args == {"model": str(entry.absolute() / "1" / "weights"), "load_format": "safetensors"}
    assert (entry / "1" / "weights" / "model.safetensors").read_bytes() == weights
    assert (entry / "1" / "weights" / "config.json").read_bytes() == LLAMA

    # Printed rather than written: the same config.
    r = triton_config(edgeroute_bin, "--dir", str(d), "--name", "tiny-llama", "--gpu", str(gpu),
                      "--repository", str(repo.absolute()))
    assert r.returncode == 0, r.stderr
    assert r.stdout == (entry / "config.pbtxt").read_text()
    assert parse(r.stdout) == cfg


@pytest.mark.parametrize("gpu", [0, 1])
def test_an_onnx_graph_becomes_a_valid_onnxruntime_entry(edgeroute_bin, workdir, gpu):
    d = snapshot(workdir / "snap", {"onnx/model.onnx": b"\x05" * 1024,
                                    "onnx/model.onnx_data": b"\x06" * 2048,
                                    "config.json": b"{}"})
    repo = workdir / "repo"
    r = triton_config(edgeroute_bin, "--dir", str(d), "--name", "whisper-enc",
                      "--gpu", str(gpu), "--out", str(repo))
    assert r.returncode == 0, r.stderr
    entry = repo / "whisper-enc"
    cfg = parse((entry / "config.pbtxt").read_text())
    assert cfg.name == "whisper-enc"
    assert cfg.backend == "onnxruntime"
    assert [(g.kind, g.count, list(g.gpus)) for g in cfg.instance_group] == [
        (PB.ModelInstanceGroup.KIND_GPU, 1, [gpu])]
    assert (entry / "1" / "model.onnx").read_bytes() == b"\x05" * 1024
    assert (entry / "1" / "model.onnx_data").read_bytes() == b"\x06" * 2048
    assert not (entry / "1" / "model.json").exists()


@pytest.mark.parametrize("files,why", [
    ({"m.Q4_0.gguf": b"GGUF"}, "GGUF"),
    ({"config.json": b'{"model_type": "x"}', "model.safetensors": b"w"}, "architectures"),
    ({"model.safetensors": b"w"}, "config.json"),
    ({"a.onnx": b"g", "b.onnx": b"g"}, "ONNX graphs"),
    ({"README.md": b"hi"}, "neither"),
])
def test_what_cannot_be_served_is_refused_and_nothing_is_written(edgeroute_bin, workdir, files,
                                                                 why):
    d = snapshot(workdir / "snap", files)
    repo = workdir / "repo"
    r = triton_config(edgeroute_bin, "--dir", str(d), "--name", "m", "--out", str(repo))
    assert r.returncode != 0
    assert why in r.stderr, r.stderr
    assert not repo.exists() or not any(p.name == "m" for p in repo.iterdir())
