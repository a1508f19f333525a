"""The OpenAPI documents in api/ against real servers: schemathesis generates requests from each
operation's schema, sends them to a real `edgeroute node` (simulator backend) and a real
discovery replica, and checks every answer: no 5xx, a documented status, a documented content
type, a body and headers that match the schema.

Operations that would change the run under the fuzzer's feet (drain, model load/unload, fault
injection) are not fuzzed; `test_node_state_changing_operations_answer_as_documented` calls each
of them once, with a request that leaves the node as it was, and validates the answer.

Bounded: a few dozen examples per operation, a request timeout, no shrinking.
"""

import subprocess
import time
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from conftest import SECRET, Proc, free_port, wait_http

ROOT = Path(__file__).resolve().parents[2]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance, response_headers_conformance]
TIMEOUT_S = 5
# Not fuzzed (they change the node's state for every later request); see the test at the end.
STATE_CHANGING = ["startDrain", "setFaults", "loadModel", "unloadModel"]


def config() -> SchemathesisConfig:
    return SchemathesisConfig.from_dict({
        "seed": 20240611,
        "request-timeout": TIMEOUT_S,
        "generation": {"mode": "positive", "max-examples": 50, "no-shrink": True,
                       "database": "none", "deterministic": True},
        "phases": {"examples": {"enabled": True}, "coverage": {"enabled": True},
                   "fuzzing": {"enabled": True}, "stateful": {"enabled": False}},
        "suppress-health-check": ["all"],
    })


NODE = schemathesis.openapi.from_path(ROOT / "api" / "node.openapi.yaml", config=config())
DISCOVERY = schemathesis.openapi.from_path(ROOT / "api" / "discovery.openapi.yaml", config=config())

SIM = ('[backend]\nkind = "sim"\n[backend.sim]\nseed = 3\nttft_base_ms = 0\n'
       'prefill_us_per_token = 0\ntokens_per_s = 0.0\n'
       # The voice surface as fast as it goes: the fuzzer's long inputs stay within its timeout.
       'speech_ttfa_ms = 0\nspeech_realtime_factor = 0.0\ntranscribe_base_ms = 0\n'
       'transcribe_ms_per_audio_s = 0\nembed_base_ms = 0\nembed_us_per_token = 0\n')
# Room for the fuzzer: the per-tenant limit and the admission cap are not what is tested here.
LIMITS = '[limits]\nrate_limit_per_s = 100000\nrate_limit_burst = 100000\n'


class Fleet:
    def __init__(self, node: str, discovery: str, tokens: dict):
        self.node, self.discovery, self.tokens = node, discovery, tokens

    def headers(self, case) -> dict:
        """A token with the scope the operation names, or none for a public one."""
        security = case.operation.definition.raw.get("security") or []
        scopes = [s for req in security for s in req.get("bearer", [])]
        return {"Authorization": f"Bearer {self.tokens[scopes[0]]}"} if scopes else {}


@pytest.fixture(scope="module")
def fleet(edgeroute_bin, tmp_path_factory):
    work = tmp_path_factory.mktemp("openapi")
    secret = work / "secret"
    secret.write_text(SECRET)
    procs = []
    try:
        port = free_port()
        cfg = work / "node.toml"
        cfg.write_text(f'[node]\nid = "spec-node"\nregion = "local"\nlisten = "127.0.0.1:{port}"\n'
                       f'[auth]\nhs256_secret_file = "{secret}"\n{LIMITS}{SIM}')
        procs.append(Proc([edgeroute_bin, "node", "--config", str(cfg)], work / "node.log"))
        node = f"http://127.0.0.1:{port}"
        wait_http(f"{node}/health", 30, procs[-1].p)

        dport = free_port()
        dcfg = work / "discovery.toml"
        dcfg.write_text(f'[discovery]\nlisten = "127.0.0.1:{dport}"\n'
                        f'[auth]\nhs256_secret_file = "{secret}"\n'
                        '[probe]\ninterval_ms = 200\ntimeout_ms = 150\n'
                        f'[[nodes]]\nid = "spec-node"\nurl = "{node}"\nregion = "local"\n')
        procs.append(Proc([edgeroute_bin, "discovery", "--config", str(dcfg)], work / "discovery.log"))
        discovery = f"http://127.0.0.1:{dport}"
        wait_http(f"{discovery}/health", 30, procs[-1].p)

        def mint(scope):
            return subprocess.run(
                [edgeroute_bin, "token", "mint", "--secret-file", str(secret), "--sub", "spec",
                 "--scope", scope, "--ttl", "3600"] + (["--fleet"] if "admin" in scope else []),
                check=True, capture_output=True, text=True).stdout.strip()

        tokens = {"inference": mint("inference"), "admin": mint("admin")}
        # Discovery answers with a candidate once it has probed the node.
        deadline = time.time() + 10
        while not httpx.get(f"{discovery}/v1/discover?model=sim-llama",
                            headers={"Authorization": f"Bearer {tokens['inference']}"}).json()["candidates"]:
            assert time.time() < deadline, "discovery never verified the node"
            time.sleep(0.05)
        yield Fleet(node, discovery, tokens)
    finally:
        for p in procs:
            p.stop()
        for p in procs:
            if p.p.returncode not in (0, -15):
                print(p.output())


@NODE.exclude(operation_id=STATE_CHANGING).parametrize()
def test_node_conforms_to_its_spec(case, fleet):
    case.call_and_validate(base_url=fleet.node, headers=fleet.headers(case), checks=CHECKS,
                           timeout=TIMEOUT_S)


@DISCOVERY.parametrize()
def test_discovery_conforms_to_its_spec(case, fleet):
    case.call_and_validate(base_url=fleet.discovery, headers=fleet.headers(case), checks=CHECKS,
                           timeout=TIMEOUT_S)


def test_node_state_changing_operations_answer_as_documented(fleet):
    """One call each to the operations the fuzzer skips, each leaving the node as it was."""

    def call(path, method, expect, **kw):
        case = NODE[path][method].Case(**kw)
        res = case.call_and_validate(base_url=fleet.node, headers=fleet.headers(case),
                                     checks=CHECKS, timeout=TIMEOUT_S)
        assert res.status_code == expect, res.text
        return res

    call("/admin/faults", "PUT", 200, body={}, media_type="application/json")
    call("/v1/models/unload", "POST", 404, body={"model": "not-here"}, media_type="application/json")
    call("/v1/models/load", "POST", 400, body={}, media_type="application/json")
    drained = call("/admin/drain", "POST", 202, body={"reason": "spec", "deadline_ms": 1000},
                   media_type="application/json")
    assert drained.json()["status"] == "draining"
    assert "reason=spec" in drained.headers["x-edgeroute-migrate"][0]
    assert call("/admin/drain", "DELETE", 200).json()["status"] == "ready"


def test_a_model_id_that_is_not_utf8_is_an_openai_error(fleet):
    case = NODE["/v1/models/{id}"]["GET"].Case(path_parameters={"id": "x"})
    res = httpx.get(f"{fleet.node}/v1/models/%FF", headers=fleet.headers(case), timeout=TIMEOUT_S)
    documented = case.operation.definition.raw["responses"]
    assert str(res.status_code) in documented, (res.status_code, res.text)
    assert res.headers["content-type"] == "application/json", (res.status_code, res.text)
    assert set(res.json()["error"]) == {"message", "type", "param", "code"}, res.text
