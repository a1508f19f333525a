"""scripts/deploy.sh end to end against a fake `kubectl` (tests/python/fake_kubectl) first on
PATH: it records every call and answers as a cluster would (Kata, GPUs, the Prometheus
Operator, objects applied so far), and fails on request — no runtime class, no GPU, a pod that
never gets ready, a node whose /health never says ready. The image build and push are fakes
that record their arguments. No cluster, registry or buildah is needed; the real kubectl
renders the overlays (`kubectl kustomize`).
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_manifests import SECRET_KEYS

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "scripts" / "deploy.sh"
FAKE = Path(__file__).resolve().parent / "fake_kubectl" / "kubectl.py"
REGIONS = {"toronto": ["tor-1", "tor-2"], "montreal": ["mtl-1", "mtl-2"],
           "vancouver": ["van-1", "van-2"]}
IMAGE = "registry.example.net/edgeroute/edgeroute:0.1.0"
TRITON = "registry.example.net/triton:26.07-custom"
MUTATING = {"apply", "create", "delete", "patch", "replace", "rollout", "scale", "annotate",
            "label", "edit", "set"}

REAL_KUBECTL = shutil.which("kubectl")


def openssl(*args):
    subprocess.run(["openssl", *args], check=True, capture_output=True)


@pytest.fixture(scope="module")
def key_bundle(tmp_path_factory):
    """A complete key directory for every region (self-signed certificates: the fake only
    reads them)."""
    if shutil.which("openssl") is None:
        pytest.fail("openssl is needed to make the test certificates")
    keys = tmp_path_factory.mktemp("keys")
    (keys / "fleet").mkdir()
    (keys / "fleet" / "jwks.json").write_text('{"keys": [{"kty": "OKP", "crv": "Ed25519", "kid": "ops-1", "x": "AAAA"}]}\n')
    (keys / "fleet" / "hf-token").write_text("hf_test_token_1\n")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(keys / "fleet" / "fleet-ca.key"), "-out", str(keys / "fleet" / "fleet-ca.crt"),
            "-subj", "/CN=edgeroute test fleet CA", "-days", "2")
    for region, nodes in REGIONS.items():
        r = keys / region
        (r / "bus").mkdir(parents=True)
        for name in ("tls", "nats-gateway"):
            openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(r / f"{name}.key"), "-out", str(r / f"{name}.crt"),
                    "-subj", f"/CN={name}.{region}", "-days", "2")
        openssl("genpkey", "-algorithm", "ed25519", "-out", str(r / "seal.key"))
        openssl("pkey", "-in", str(r / "seal.key"), "-pubout", "-out", str(r / "seal.pub"))
        (r / "discovery-probe.jwt").write_text("eyJhbGciOiJFZERTQSJ9.probe.sig\n")
        (r / "metrics.jwt").write_text("eyJhbGciOiJFZERTQSJ9.metrics.sig\n")
        for user in [*nodes, "discovery", "dns"]:
            (r / "bus" / f"{user}.nk").write_text(f"SUTEST{user.upper().replace('-', '')}\n")
            (r / "bus" / f"{user}.user.conf").write_text(f"  # {user}\n  {{ nkey: U{user.upper().replace('-', '')} }}\n")
    return keys


class Cluster:
    """One fake cluster: a PATH with the fake kubectl, build and push; its call log and state."""

    def __init__(self, tmp: Path, keys: Path):
        if REAL_KUBECTL is None:
            pytest.fail("kubectl is needed (kubectl kustomize renders the overlays): scripts/test.sh installs it")
        self.tmp = tmp
        self.keys = tmp / "keys"
        shutil.copytree(keys, self.keys)
        self.bin = tmp / "bin"
        self.bin.mkdir()
        self.log = tmp / "kubectl.jsonl"
        self.state = tmp / "state.json"
        self.tools_log = tmp / "tools.jsonl"
        (self.bin / "kubectl").write_text(f'#!/bin/sh\nexec "{sys.executable}" -S "{FAKE}" "$@"\n')
        recorder = (f'#!/bin/sh\n"{sys.executable}" -c \'import json, sys; '
                    f'open(sys.argv[1], "a").write(json.dumps(sys.argv[2:]) + "\\n")\' '
                    f'"{self.tools_log}" "$(basename "$0")" "$@"\nexit "${{FAKE_TOOL_EXIT:-0}}"\n')
        for tool in ("skopeo", "build-image"):
            (self.bin / tool).write_text(recorder)
        for f in self.bin.iterdir():
            f.chmod(0o755)
        self.env = {
            **os.environ,
            "PATH": f"{self.bin}:{os.environ['PATH']}",
            "FAKE_KUBECTL_LOG": str(self.log),
            "FAKE_KUBECTL_STATE": str(self.state),
            "FAKE_KUBECTL_REAL": REAL_KUBECTL,
            "FAKE_KUBECTL_SITE": str(Path(yaml.__file__).resolve().parents[1]),
            "EDGEROUTE_BUILD_IMAGE": str(self.bin / "build-image"),
            "EDGEROUTE_DEPLOY_POLL_S": "0.1",
        }
        for k in list(self.env):
            if k.startswith(("FAKE_KUBECTL_", "EDGEROUTE_KEYS", "EDGEROUTE_IMAGE", "KUBECTL", "SKOPEO")) \
                    and k not in ("FAKE_KUBECTL_LOG", "FAKE_KUBECTL_STATE", "FAKE_KUBECTL_REAL", "FAKE_KUBECTL_SITE"):
                del self.env[k]

    def deploy(self, *args, region="toronto", env=None, timeout=120):
        argv = ["bash", str(DEPLOY), "--region", region, "--keys", str(self.keys),
                "--image", IMAGE, "--triton-image", TRITON, *args]
        return subprocess.run(argv, env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout, cwd=self.tmp)

    def calls(self):
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def tools(self):
        if not self.tools_log.exists():
            return []
        return [json.loads(line) for line in self.tools_log.read_text().splitlines()]

    def objects(self):
        return json.loads(self.state.read_text()) if self.state.exists() else {}


def verbs(call):
    """The call's command words, without global flags (the run's work directory named
    alike)."""
    argv, out, skip = call["argv"], [], False
    for a in argv:
        a = re.sub(r"edgeroute-deploy\.[A-Za-z0-9]+", "edgeroute-deploy.WORK", a)
        a = re.sub(r"^--timeout=\d+s$", "--timeout=Ns", a)
        if skip:
            skip = False
            continue
        if a in ("--context", "-n", "--namespace"):
            skip = True
            continue
        out.append(a)
    return out


def mutating(call):
    v = verbs(call)
    if not v:
        return False
    if v[0] == "create" and "--dry-run=client" in v:
        return False  # prints an object, changes nothing
    return v[0] in MUTATING


def secrets(objects):
    """The cluster's Secrets: name -> sorted keys."""
    return {o["metadata"]["name"]: sorted(o["data"]) for o in objects.values() if o["kind"] == "Secret"}


@pytest.fixture
def cluster(tmp_path, key_bundle):
    return Cluster(tmp_path, key_bundle)


def ok(r):
    assert r.returncode == 0, f"exit {r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"


@pytest.mark.parametrize("region", sorted(REGIONS))
def test_a_region_is_checked_built_given_its_secrets_applied_and_waited_for(cluster, region):
    r = cluster.deploy(region=region)
    ok(r)
    calls = cluster.calls()
    v = [verbs(c) for c in calls]

    # Prerequisites first, and all of them, before anything changes.
    first_change = next(i for i, c in enumerate(calls) if mutating(c))
    checks = [w[:3] for w in v[:first_change]]
    for want in (["config", "current-context"], ["get", "runtimeclass", "kata"],
                 ["get", "nodes", "-o"], ["get", "crd", "servicemonitors.monitoring.coreos.com"]):
        assert want in checks, f"{want} not checked before the first change: {checks}"

    # The image: built with the tag, pushed to the reference the manifests name.
    tools = cluster.tools()
    assert tools[0][0] == "build-image" and tools[0][tools[0].index("--tag") + 1] == "0.1.0"
    assert tools[1] == ["skopeo", "copy", tools[1][2], f"docker://{IMAGE}"]
    assert tools[1][2].startswith("oci:") and tools[1][2].endswith(":0.1.0")

    # The namespace, then every Secret, then the overlay, then the waits.
    applies = [(i, c["objects"]) for i, c in enumerate(calls) if verbs(c)[:1] == ["apply"]]
    assert [kinds for _, kinds in applies][0] == ["Namespace/edgeroute"]
    assert v[applies[0][0]][2].endswith("/namespace.yaml")
    assert len(applies) == 3, [o for _, o in applies]
    (_, secret_objects), (manifests_at, manifest_objects) = applies[1], applies[2]
    assert {o.split("/")[0] for o in secret_objects} == {"Secret"}
    assert f"Deployment/gateway-{REGIONS[region][0]}" in manifest_objects
    assert not any(o.startswith("Secret/") for o in manifest_objects), "a Secret in the manifests"
    rollouts = [i for i, w in enumerate(v) if w[:2] == ["rollout", "status"]]
    assert rollouts and min(rollouts) > manifests_at

    # Secrets: exactly the ones the manifests mount, with the keys they read; the bus Secret
    # holds this region's nodes' seeds and no other region's.
    objects = cluster.objects()
    made = secrets(objects)
    assert sorted(f"Secret/{n}" for n in made) == sorted(secret_objects)
    expected = {name: sorted(keys) for name, keys in SECRET_KEYS.items()}
    expected["edgeroute-bus"] = sorted([f"{n}.nk" for n in REGIONS[region]] + ["discovery.nk", "dns.nk"])
    assert made == expected
    users = base64.b64decode(objects["Secret/edgeroute/nats-users"]["data"]["users.conf"]).decode()
    assert users.startswith("users: [") and users.rstrip().endswith("]")
    for n in REGIONS[region]:
        assert f"U{n.upper().replace('-', '')}" in users
    assert base64.b64decode(objects["Secret/edgeroute/edgeroute-hf"]["data"]["token"]).decode() == "hf_test_token_1\n"
    assert objects["Secret/edgeroute/edgeroute-tls"]["type"] == "kubernetes.io/tls"

    # The right overlay: this region's nodes, every object labelled with the region, every
    # edgeroute container on the pushed image and every Triton on the given one.
    workloads = {k.split("/")[2] for k, o in objects.items() if o["kind"] in ("Deployment", "StatefulSet")}
    assert workloads == {"nats", "discovery", "router", "dns",
                         *[f"gateway-{n}" for n in REGIONS[region]], *[f"triton-{n}" for n in REGIONS[region]]}
    for k, o in objects.items():
        if o["kind"] not in ("Secret", "Namespace"):
            assert o["metadata"]["labels"]["edgeroute.dev/region"] == region, k
        if o["kind"] in ("Deployment", "StatefulSet"):
            for c in o["spec"]["template"]["spec"]["containers"]:
                assert c["image"] in (IMAGE, TRITON) or c["name"] == "nats", (k, c["image"])
                if c["name"] in ("gateway", "watch", "discovery", "router", "dns"):
                    assert c["image"] == IMAGE
                if c["name"] == "triton":
                    assert c["image"] == TRITON
    # Every Secret a manifest names was created by the script.
    named = set()
    for o in objects.values():
        if o["kind"] in ("Deployment", "StatefulSet"):
            named |= {vol["secret"]["secretName"] for vol in o["spec"]["template"]["spec"]["volumes"] if "secret" in vol}
        if o["kind"] == "ServiceMonitor":
            text = json.dumps(o)
            named |= {s for s in SECRET_KEYS if f'"name": "{s}"' in text}
    assert named and named <= set(made), named - set(made)

    # Every workload waited for, and every node's /health read through the API server.
    waited = {w[2] for w in v if w[:2] == ["rollout", "status"]}
    assert waited == {f"{'statefulset' if w.startswith(('nats', 'triton')) else 'deployment'}/{w}" for w in workloads}
    raw = [w[2] for w in v if w[:2] == ["get", "--raw"]]
    for n in REGIONS[region]:
        assert f"/api/v1/namespaces/edgeroute/services/https:gateway-{n}:8443/proxy/health" in raw
    assert any("https:discovery:7070" in p for p in raw) and any("https:router:8090" in p for p in raw)
    assert f"region {region} deployed" in r.stdout


def test_a_second_run_changes_nothing_and_a_rotated_key_replaces_only_its_secret(cluster):
    ok(cluster.deploy())
    first = [verbs(c) for c in cluster.calls()]
    state = cluster.objects()
    cluster.log.unlink()
    again = cluster.deploy()
    ok(again)
    assert [verbs(c) for c in cluster.calls()] == first, "the second run made other calls"
    assert cluster.objects() == state
    changed = [l for l in again.stdout.splitlines() if l.endswith((" created", " configured"))]
    assert changed == [], f"a second run with the same files changed: {changed}"
    assert again.stdout.count(" unchanged") >= len(state)

    # Rotation: a new Hugging Face token replaces that Secret and nothing else.
    (cluster.keys / "fleet" / "hf-token").write_text("hf_rotated_token_2\n")
    rotated = cluster.deploy("--skip-build")
    ok(rotated)
    changed = [l for l in rotated.stdout.splitlines() if l.endswith((" created", " configured"))]
    assert changed == ["secret/edgeroute-hf configured"]
    assert "rotated: edgeroute-hf —" in rotated.stdout and "rotated:" not in again.stdout


def test_dry_run_prints_every_step_and_changes_nothing(cluster):
    r = cluster.deploy("--dry-run")
    ok(r)
    calls = cluster.calls()
    assert calls, "the dry run checked nothing"
    assert [c["argv"] for c in calls if mutating(c)] == []
    assert not any(verbs(c)[:2] == ["get", "--raw"] for c in calls)
    assert cluster.tools() == [], "the dry run built or pushed"
    assert cluster.objects() == {}
    # Each step is shown.
    out = r.stdout
    for step in ("build-image --tag 0.1.0", "skopeo copy", "apply -f namespace.yaml",
                 "apply -f secrets.yaml", "rollout status deployment/gateway-tor-1",
                 "rollout status statefulset/triton-tor-2", "services/https:gateway-tor-2:8443/proxy/health"):
        assert any(step in line and "dry run: not run" in line for line in out.splitlines()), step
    # The Secrets are still made (on paper: `create --dry-run=client` checks their files).
    for name in ("generic edgeroute-hf", "tls edgeroute-tls", "generic edgeroute-bus", "generic nats-users"):
        assert f"create secret {name}" in out
    # The checks still ran (a dry run validates).
    assert ["get", "runtimeclass", "kata", "-o", "name"] in [verbs(c) for c in calls]
    assert "dry run done" in out


@pytest.mark.parametrize("knob, exit_code, words", [
    ({"FAKE_KUBECTL_NO_RUNTIMECLASS": "1"}, 3, ["RuntimeClass `kata`", "kata-deploy"]),
    ({"FAKE_KUBECTL_GPUS": "0,0"}, 3, ["offers 0 nvidia.com/gpu", "device plugin"]),
    ({"FAKE_KUBECTL_GPUS": "1,0"}, 3, ["offers 1 nvidia.com/gpu", "need 2"]),
    ({"FAKE_KUBECTL_CONTEXT": ""}, 3, ["no current context", "--context"]),
    ({"FAKE_KUBECTL_NO_CRDS": "1"}, 3, ["Prometheus Operator"]),
])
def test_a_missing_prerequisite_stops_before_any_change(cluster, knob, exit_code, words):
    r = cluster.deploy(env=knob)
    assert r.returncode == exit_code, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    assert [c["argv"] for c in cluster.calls() if mutating(c)] == []
    assert cluster.tools() == []


def test_an_unknown_context_is_refused_and_a_given_one_is_named_in_every_call(cluster):
    r = cluster.deploy("--context", "edge-elsewhere")
    assert r.returncode == 3 and "no context `edge-elsewhere`" in r.stderr
    r = cluster.deploy("--context", "edge-test", "--dry-run")
    ok(r)
    # Every cluster call names the context, those run and those only printed.
    assert all("--context" in c["argv"] for c in cluster.calls() if verbs(c)[:1] not in (["kustomize"], ["config"]))
    printed = [l for l in r.stdout.splitlines() if l.startswith("+ ") and " kustomize " not in l and " config " not in l]
    assert printed and all("--context edge-test" in l for l in printed if "kubectl" in l)


def test_missing_key_files_are_each_named_with_how_to_make_them(cluster):
    (cluster.keys / "toronto" / "bus" / "tor-2.nk").unlink()
    (cluster.keys / "fleet" / "hf-token").unlink()
    r = cluster.deploy()
    assert r.returncode == 3
    assert f"{cluster.keys}/toronto/bus/tor-2.nk" in r.stderr
    assert "edgeroute bus credentials --node tor-2 --region toronto" in r.stderr
    assert f"{cluster.keys}/fleet/hf-token" in r.stderr
    assert "tor-1.nk" not in r.stderr
    assert [c["argv"] for c in cluster.calls() if mutating(c)] == []


def test_a_pod_that_never_gets_ready_fails_with_its_name(cluster):
    r = cluster.deploy("--skip-build", env={"FAKE_KUBECTL_NEVER_READY": "deployment/gateway-tor-2"})
    assert r.returncode == 6, r.stderr
    assert "deployment/gateway-tor-2 is not ready" in r.stderr
    assert "kubectl -n edgeroute describe deployment/gateway-tor-2" in r.stderr
    assert cluster.tools() == [], "--skip-build built"
    # It was applied, and waited for with a bounded timeout.
    waits = [c["argv"] for c in cluster.calls() if verbs(c)[:2] == ["rollout", "status"]]
    assert any("deployment/gateway-tor-2" in w for w in waits)
    assert all(any(a.startswith("--timeout=") for a in w) for w in waits)


def test_a_node_whose_health_never_says_ready_times_out_naming_it(cluster):
    r = cluster.deploy("--skip-build", "--timeout", "4", env={"FAKE_KUBECTL_UNHEALTHY": "tor-2"})
    assert r.returncode == 6, r.stderr
    assert "not ready on /health after 4s: node tor-2" in r.stderr
    assert "tor-1" not in r.stderr.split("after 4s:")[1].split("(")[0]
    asked = [c for c in cluster.calls() if verbs(c)[:2] == ["get", "--raw"] and "gateway-tor-2" in c["argv"][-1]]
    assert len(asked) >= 2, "it did not ask again before giving up"


def test_a_failed_build_or_a_refused_apply_has_its_own_exit_code(cluster):
    r = cluster.deploy(env={"FAKE_TOOL_EXIT": "1"})
    assert r.returncode == 4 and "image build failed" in r.stderr
    assert not any(verbs(c)[:1] == ["apply"] for c in cluster.calls())
    r = cluster.deploy("--skip-build", env={"FAKE_KUBECTL_REFUSE_KIND": "PodDisruptionBudget"})
    assert r.returncode == 5 and "refused the manifests of toronto" in r.stderr


@pytest.mark.parametrize("args, words", [
    (["--region", "atlantis"], ["no overlay for region `atlantis`", "montreal", "toronto", "vancouver"]),
    (["--region", "toronto", "--image", "registry.example.net/edgeroute"], ["names no tag"]),
    (["--region", "toronto", "--timeout", "soon"], ["--timeout takes seconds"]),
    (["--region", "toronto", "--force"], ["unknown argument `--force`"]),
])
def test_usage_mistakes_exit_2(cluster, args, words):
    argv = ["bash", str(DEPLOY), "--keys", str(cluster.keys), "--image", IMAGE, *args]
    r = subprocess.run(argv, env=cluster.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    for w in words:
        assert w in r.stderr
    assert [c["argv"] for c in cluster.calls() if mutating(c)] == []
