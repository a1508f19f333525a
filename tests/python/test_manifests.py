"""The Kubernetes manifests (deploy/k8s), rendered per region with `kubectl kustomize` and
checked offline: against Kubernetes' own schemas (kubernetes-validate), against the real
binary (every command and flag, every config file, every metric a dashboard or alert names),
against a real nats-server (`-t`), and for the security boundary (Triton admits only its own
gateway; no container runs as root; only the watch sidecar holds the Hugging Face token).
"""

import copy
import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import tomllib
from pathlib import Path

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
REGIONS = sorted(p.name for p in (K8S / "overlays").iterdir() if p.is_dir())
K8S_VERSION = "1.32"

# Every Secret the manifests mount, with the keys they read; scripts/deploy.sh makes exactly
# these from key files (test_deploy.py holds it to that), plus `edgeroute-bus`: the region's
# bus seeds, one per node and `discovery.nk`, `dns.nk`.
SECRET_KEYS = {
    "edgeroute-jwt": {"jwks.json"},
    "edgeroute-fleet-ca": {"ca.crt"},
    "edgeroute-hf": {"token"},
    "edgeroute-tls": {"tls.crt", "tls.key"},
    "nats-gateway-tls": {"tls.crt", "tls.key"},
    "edgeroute-seal": {"seal.key", "seal.pub"},
    "edgeroute-discovery-token": {"token"},
    "edgeroute-metrics-token": {"token"},
    "nats-users": {"users.conf"},
}
# Our containers (the one edgeroute image; the command picks the role).
OURS = {"gateway", "watch", "discovery", "router", "dns"}


def kubectl():
    path = shutil.which("kubectl")
    if path is None:
        pytest.fail("kubectl is needed (kubectl kustomize renders the overlays): scripts/test.sh installs it")
    return path


@functools.lru_cache(maxsize=None)
def render(region: str) -> tuple:
    out = subprocess.run([kubectl(), "kustomize", str(K8S / "overlays" / region)],
                         check=True, capture_output=True, text=True)
    return tuple(d for d in yaml.load_all(out.stdout, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d)


def node_ids(region):
    return sorted(p.name for p in (K8S / "overlays" / region / "nodes").iterdir() if p.is_dir())


def objects(region, kind):
    return [d for d in render(region) if d["kind"] == kind]


def workloads(region):
    return [d for d in render(region) if d["kind"] in ("Deployment", "StatefulSet")]


def one(region, kind, name):
    found = [d for d in render(region) if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name} in {region}: {len(found)}"
    return found[0]


def selects(selector: dict, labels: dict) -> bool:
    """A matchLabels selector; an empty one selects everything."""
    return all(labels.get(k) == v for k, v in (selector or {}).items())


def configmap_file(region, name_prefix, key):
    cms = [c for c in objects(region, "ConfigMap") if c["metadata"]["name"].startswith(name_prefix + "-")
           and key in c.get("data", {})]
    assert len(cms) == 1, (region, name_prefix, [c["metadata"]["name"] for c in cms])
    return cms[0]["data"][key]


def configmap_named(region, name):
    return one(region, "ConfigMap", name)


# --- schemas ------------------------------------------------------------------------------

# The Prometheus Operator's CRDs are not in kubernetes-validate: the fields we use, checked.
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {"type": "object", "required": ["matchLabels"]},
                "endpoints": {"type": "array", "minItems": 1, "items": {
                    "type": "object",
                    "required": ["port", "scheme", "path"],
                    "additionalProperties": False,
                    "properties": {
                        "port": {"type": "string"},
                        "scheme": {"enum": ["http", "https"]},
                        "path": {"type": "string", "pattern": "^/"},
                        "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m)$"},
                        "tlsConfig": {"type": "object", "additionalProperties": False, "properties": {
                            "ca": {"type": "object", "required": ["secret"], "properties": {
                                "secret": {"type": "object", "required": ["name", "key"]}}},
                            "serverName": {"type": "string"},
                            "insecureSkipVerify": {"const": False}}},
                        "authorization": {"type": "object", "required": ["type", "credentials"], "properties": {
                            "type": {"const": "Bearer"},
                            "credentials": {"type": "object", "required": ["name", "key"]}}},
                        "relabelings": {"type": "array", "items": {
                            "type": "object", "required": ["sourceLabels", "targetLabel"]}},
                    },
                }},
            },
        },
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "spec": {"type": "object", "required": ["groups"], "additionalProperties": False, "properties": {
            "groups": {"type": "array", "minItems": 1, "items": {
                "type": "object", "required": ["name", "rules"], "additionalProperties": False,
                "properties": {"name": {"type": "string"}, "rules": {"type": "array", "minItems": 1, "items": {
                    "type": "object", "required": ["alert", "expr", "labels", "annotations"],
                    "additionalProperties": False,
                    "properties": {
                        "alert": {"type": "string", "pattern": "^[A-Z][A-Za-z0-9]+$"},
                        "expr": {"type": "string", "minLength": 1},
                        "for": {"type": "string", "pattern": "^[0-9]+(s|m|h)$"},
                        "labels": {"type": "object", "required": ["severity"], "properties": {
                            "severity": {"enum": ["critical", "warning", "info"]}}},
                        "annotations": {"type": "object", "required": ["summary"]},
                    }}}}}},
        }},
    },
}
CRD_SCHEMAS = {"ServiceMonitor": SERVICE_MONITOR, "PrometheusRule": PROMETHEUS_RULE}


@pytest.mark.parametrize("region", REGIONS)
def test_every_object_validates_against_the_kubernetes_schemas(region):
    docs = render(region)
    assert len(docs) > 30
    for d in docs:
        if d["kind"] in CRD_SCHEMAS:
            jsonschema.validate(d, CRD_SCHEMAS[d["kind"]])
        else:
            kubernetes_validate.validate(d, K8S_VERSION, strict=True)
    # The validators can fail: a misspelt field and a wrong type are refused.
    gateway = copy.deepcopy(one(region, "Deployment", f"gateway-{node_ids(region)[0]}"))
    gateway["spec"]["template"]["spec"]["runtimeClass"] = "kata"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(gateway, K8S_VERSION, strict=True)
    monitor = copy.deepcopy(objects(region, "ServiceMonitor")[0])
    monitor["spec"]["endpoints"][0]["tlsConfig"]["insecureSkipVerify"] = True
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, SERVICE_MONITOR)


@pytest.mark.parametrize("region", REGIONS)
def test_every_service_monitor_scrapes_a_named_port_of_the_services_it_selects(region):
    services = objects(region, "Service")
    for sm in objects(region, "ServiceMonitor"):
        chosen = [s for s in services if selects(sm["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
        assert chosen, f"{sm['metadata']['name']} selects no Service"
        for s in chosen:
            ports = {p["name"] for p in s["spec"]["ports"]}
            for e in sm["spec"]["endpoints"]:
                assert e["port"] in ports, (sm["metadata"]["name"], s["metadata"]["name"])
                # The Service's pods serve TLS there: the probe says so too.
                pods = [w for w in workloads(region)
                        if selects(s["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])]
                assert pods
                for w in pods:
                    probe = w["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]
                    assert probe["scheme"] == e["scheme"].upper()
                # The Secrets it reads are ones scripts/deploy.sh makes, with those keys.
                refs = [e["tlsConfig"]["ca"]["secret"], e.get("authorization", {}).get("credentials")]
                for ref in filter(None, refs):
                    assert ref["key"] in SECRET_KEYS[ref["name"]], ref


# --- the security boundary ----------------------------------------------------------------

def pod_templates(region):
    return [(f"{w['kind']}/{w['metadata']['name']}", w["spec"]["template"]) for w in workloads(region)]


def ingress_peers(policies, pod_labels):
    """What may reach a pod: [(peer, ports)] over every policy that selects it, and whether any
    policy selects it at all (else everything may)."""
    selected = [p for p in policies if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                and selects(p["spec"]["podSelector"].get("matchLabels"), pod_labels)]
    rules = []
    for p in selected:
        for rule in p["spec"].get("ingress", []):
            ports = sorted((x.get("protocol", "TCP"), x["port"]) for x in rule.get("ports", [])) or ["any"]
            for peer in rule.get("from", [None]):
                rules.append((peer, ports))
    return bool(selected), rules


def triton_admission_problems(docs):
    """Why Triton would admit someone other than its own gateway on its OpenAI port, if it
    would."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    templates = [(d["metadata"]["name"], d["spec"]["template"]) for d in docs
                 if d["kind"] in ("Deployment", "StatefulSet")]
    problems = []
    for name, tmpl in templates:
        labels = tmpl["metadata"]["labels"]
        if labels.get("app.kubernetes.io/name") != "triton":
            continue
        node = labels.get("edgeroute.dev/node")
        if node is None:
            problems.append(f"{name}: its pods carry no edgeroute.dev/node label")
        openai = [p["containerPort"] for c in tmpl["spec"]["containers"] if c["name"] == "triton"
                  for p in c["ports"] if p["name"] == "openai"]
        covered, rules = ingress_peers(policies, labels)
        if not covered:
            problems.append(f"{name}: no NetworkPolicy selects it (open to all)")
        for peer, ports in rules:
            if peer is None or set(peer) != {"podSelector"}:
                problems.append(f"{name}: admits {peer or 'everyone'} on {ports}")
                continue
            reached = [n for n, t in templates if selects(peer["podSelector"].get("matchLabels"), t["metadata"]["labels"])]
            if reached != [f"gateway-{node}"]:
                problems.append(f"{name}: admits pods of {reached}")
            if ports != [("TCP", port) for port in openai]:
                problems.append(f"{name}: admits ports {ports}, not only its OpenAI port {openai}")
    return problems


@pytest.mark.parametrize("region", REGIONS)
def test_triton_admits_only_its_own_gateway_on_its_openai_port(region):
    docs = list(render(region))
    tritons = [d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"].startswith("triton-")]
    assert len(tritons) == len(node_ids(region))
    assert triton_admission_problems(docs) == []
    # A default deny stands behind it for everything else in the namespace.
    deny = one(region, "NetworkPolicy", "default-deny-ingress")
    assert deny["spec"]["podSelector"] == {} and "ingress" not in deny["spec"]
    # The check can fail: a policy opening Triton to the namespace, a node's policy naming
    # every gateway, and one admitting the repository API port are each caught.
    opened = docs + [{"kind": "NetworkPolicy", "metadata": {"name": "oops"}, "spec": {
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "triton"}},
        "policyTypes": ["Ingress"], "ingress": [{"from": [{"namespaceSelector": {}}]}]}}]
    assert any("admits" in p for p in triton_admission_problems(opened))
    loose = copy.deepcopy(docs)
    for d in loose:
        if d["kind"] == "NetworkPolicy" and d["metadata"]["name"].startswith("triton-"):
            d["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].pop("edgeroute.dev/node")
            d["spec"]["ingress"][0]["ports"].append({"protocol": "TCP", "port": 8000})
    problems = triton_admission_problems(loose)
    assert any("admits pods of" in p for p in problems) and any("8000" in p for p in problems)


def container_problems(pod_spec, c):
    """Ways a container could run as root or with more than it needs."""
    pod = pod_spec.get("securityContext", {})
    sc = {**pod, **c.get("securityContext", {})}
    out = []
    if sc.get("runAsNonRoot") is not True:
        out.append("runAsNonRoot is not true")
    if sc.get("runAsUser") in (None, 0):
        out.append(f"runAsUser {sc.get('runAsUser')}")
    if sc.get("runAsGroup") == 0:
        out.append("runAsGroup 0")
    csc = c.get("securityContext", {})
    if csc.get("allowPrivilegeEscalation") is not False:
        out.append("allowPrivilegeEscalation not false")
    if csc.get("privileged"):
        out.append("privileged")
    if csc.get("readOnlyRootFilesystem") is not True:
        out.append("root filesystem writable")
    caps = csc.get("capabilities", {})
    if caps.get("drop") != ["ALL"] or caps.get("add"):
        out.append(f"capabilities {caps}")
    if sc.get("seccompProfile", {}).get("type") != "RuntimeDefault":
        out.append("seccomp not RuntimeDefault")
    return out


@pytest.mark.parametrize("region", REGIONS)
def test_no_container_runs_as_root_or_keeps_privileges(region):
    seen = 0
    for name, tmpl in pod_templates(region):
        spec = tmpl["spec"]
        assert spec.get("automountServiceAccountToken") is False, f"{name}: API token mounted"
        for k in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(k), f"{name}: {k}"
        assert not any("hostPath" in v for v in spec.get("volumes", [])), f"{name}: hostPath"
        for c in spec.get("initContainers", []) + spec["containers"]:
            seen += 1
            assert container_problems(spec, c) == [], f"{name}/{c['name']}"
    assert seen >= 6
    # The check can fail.
    assert container_problems({}, {"name": "x"})
    assert "runAsUser 0" in container_problems({"securityContext": {"runAsNonRoot": True, "runAsUser": 0}}, {"name": "x"})
    # And the namespace enforces it too (Pod Security "restricted").
    ns = one(region, "Namespace", "edgeroute")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


@pytest.mark.parametrize("region", REGIONS)
def test_the_gateway_runs_in_kata_without_a_gpu_and_triton_has_one(region):
    for n in node_ids(region):
        g = one(region, "Deployment", f"gateway-{n}")["spec"]["template"]["spec"]
        assert g["runtimeClassName"] == "kata"
        for c in g["containers"]:
            res = json.dumps(c.get("resources", {}))
            assert "nvidia.com/gpu" not in res
            assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in c.get("env", [])
        t = one(region, "StatefulSet", f"triton-{n}")["spec"]["template"]["spec"]
        assert "runtimeClassName" not in t
        triton = next(c for c in t["containers"] if c["name"] == "triton")
        assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert "--model-control-mode=explicit" in triton["args"]
        watch = next(c for c in t["containers"] if c["name"] == "watch")
        assert "nvidia.com/gpu" not in json.dumps(watch["resources"])


@pytest.mark.parametrize("region", REGIONS)
def test_only_the_watch_sidecar_holds_the_hugging_face_token(region):
    holders = []
    for name, tmpl in pod_templates(region):
        spec = tmpl["spec"]
        hf_volumes = {v["name"] for v in spec.get("volumes", []) if v.get("secret", {}).get("secretName") == "edgeroute-hf"}
        for c in spec["containers"]:
            text = json.dumps(c)
            assert "HF_TOKEN" not in text, f"{name}/{c['name']}"
            assert "edgeroute-hf" not in json.dumps(c.get("envFrom", [])) + json.dumps(c.get("env", []))
            mounts = [m for m in c.get("volumeMounts", []) if m["name"] in hf_volumes]
            if mounts:
                holders.append((name, c["name"]))
                assert mounts[0]["readOnly"] is True
                assert f"--hf-token-file={mounts[0]['mountPath']}/token" in c["args"]
    assert sorted(holders) == sorted((f"StatefulSet/triton-{n}", "watch") for n in node_ids(region))


def test_no_secret_material_is_committed():
    for region in REGIONS:
        assert not [d for d in render(region) if d["kind"] == "Secret"]
    for p in K8S.rglob("*"):
        if p.is_file():
            text = p.read_text()
            assert "PRIVATE KEY" not in text and "hf_" not in text.replace("hf_token", ""), p
            assert not re.search(r"\bSU[A-Z2-7]{50,}", text), f"an NKey seed in {p}"


# --- the binary: commands, flags, configs, mounts -----------------------------------------

@functools.lru_cache(maxsize=None)
def help_text(binary, *command):
    out = subprocess.run([binary, *command, "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def edgeroute_containers(region):
    for name, tmpl in pod_templates(region):
        for c in tmpl["spec"]["containers"]:
            if c["image"] == "edgeroute":
                yield name, tmpl, c


@pytest.mark.parametrize("region", REGIONS)
def test_every_command_and_flag_in_the_manifests_is_the_binarys(region, edgeroute_bin):
    """Each container of the edgeroute image runs a real subcommand with real flags. The
    watch sidecar's `--hf-token-file` is checked too: it fails until `edgeroute watch` has it."""
    top = help_text(edgeroute_bin)
    seen = set()
    for name, _, c in edgeroute_containers(region):
        assert c["name"] in OURS, f"{name}/{c['name']} runs the edgeroute image"
        assert "command" not in c, "the image's entrypoint is the binary"
        sub, *args = c["args"]
        assert re.search(rf"^\s+{sub}\s", top, re.M), f"`edgeroute {sub}` is no command"
        flags = set(re.findall(r"(--[a-z0-9][a-z0-9-]*)", help_text(edgeroute_bin, sub)))
        for a in args:
            assert a.startswith("--") and "=" in a, f"{name}: `{a}` (flags are written --flag=value)"
            flag = a.split("=", 1)[0]
            assert flag in flags, f"{name}/{c['name']}: `edgeroute {sub}` has no {flag}"
        seen.add(sub)
    assert seen == {"node", "watch", "discovery", "router", "dns"}
    # The other images: Triton by its logical name (scripts/deploy.sh sets it), NATS pinned.
    images = {c["image"] for _, t in pod_templates(region) for c in t["spec"]["containers"]}
    assert images == {"edgeroute", "triton", "docker.io/library/nats:2.10.24-alpine"}


@pytest.mark.parametrize("region", REGIONS)
def test_node_configs_agree_with_the_overlay_discovery_and_triton(region):
    gateways = {w["metadata"]["labels"]["edgeroute.dev/node"] for w in objects(region, "Deployment")
                if w["metadata"]["name"].startswith("gateway-")}
    assert gateways == set(node_ids(region))
    fleet = {n: r for r in REGIONS for n in node_ids(r)}
    for n in node_ids(region):
        g = one(region, "Deployment", f"gateway-{n}")["spec"]["template"]["spec"]
        cm = next(v["configMap"]["name"] for v in g["volumes"] if v["name"] == "config")
        cfg = tomllib.loads(configmap_named(region, cm)["data"]["node.toml"])
        assert cfg["node"]["id"] == n and cfg["node"]["region"] == region
        port = int(cfg["node"]["listen"].rsplit(":", 1)[1])
        gw = g["containers"][0]
        assert [p["containerPort"] for p in gw["ports"] if p["name"] == "https"] == [port]
        svc = one(region, "Service", f"gateway-{n}")
        assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["ports"][0]["port"] == port
        assert cfg["node"]["public_url"] == f"https://{n}.edge.example.net:{port}"
        # Its bus seed, and no other node's.
        bus = next(v for v in g["volumes"] if v["name"] == "bus")
        assert bus["secret"]["items"] == [{"key": f"{n}.nk", "path": "node.nk"}]
        # Its backend is its own Triton's OpenAI port.
        url = httpx.URL(cfg["backend"]["url"])
        triton_svc = one(region, "Service", url.host)
        t = one(region, "StatefulSet", f"triton-{n}")
        assert triton_svc["spec"]["clusterIP"] == "None" and t["spec"]["serviceName"] == url.host
        # It selects this node's Triton pods and nothing else.
        assert [w["metadata"]["name"] for w in workloads(region)
                if selects(triton_svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])] == [f"triton-{n}"]
        assert [w["metadata"]["name"] for w in workloads(region)
                if selects(svc["spec"]["selector"], w["spec"]["template"]["metadata"]["labels"])] == [f"gateway-{n}"]
        openai = [p for c in t["spec"]["template"]["spec"]["containers"] for p in c.get("ports", []) if p["name"] == "openai"]
        assert [p["containerPort"] for p in openai] == [url.port] == [triton_svc["spec"]["ports"][0]["port"]]
        triton = t["spec"]["template"]["spec"]["containers"][0]
        assert f"--openai-port={url.port}" in triton["args"]
        # The shared volume: where the gateway installs and where the watch sidecar looks.
        gw_shared = next(m["mountPath"] for m in gw["volumeMounts"] if m["name"] == "shared")
        assert cfg["models"]["repository"] == gw_shared
        watch = next(c for c in t["spec"]["template"]["spec"]["containers"] if c["name"] == "watch")
        assert f"--shared={gw_shared}" in watch["args"]
        pvc = lambda spec: next(v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if v["name"] == "shared")
        assert pvc(g) == pvc(t["spec"]["template"]["spec"]) == f"models-shared-{n}"
        assert one(region, "PersistentVolumeClaim", f"models-shared-{n}")["spec"]["accessModes"] == ["ReadWriteMany"]
        # The seal: the gateway signs with the region's key, the sidecar trusts its public half.
        assert f"--seal-public-key={cfg['models']['seal_kid']}=/etc/edgeroute/seal/seal.pub" in watch["args"]
    # Discovery lists every node of the fleet at its public URL, in its region.
    disc = tomllib.loads(configmap_file(region, "discovery-config", "discovery.toml"))
    listed = {x["id"]: (x["url"], x["region"]) for x in disc["nodes"]}
    assert listed == {n: (f"https://{n}.edge.example.net:8443", r) for n, r in fleet.items()}
    assert disc["discovery"]["region"] == region
    router = tomllib.loads(configmap_file(region, "router-config", "router.toml"))
    assert router["router"]["region"] == region


@pytest.mark.parametrize("region", REGIONS)
def test_probes_ports_resources_and_disruption_budgets(region):
    pdbs = objects(region, "PodDisruptionBudget")
    for name, tmpl in pod_templates(region):
        covering = [p for p in pdbs if selects(p["spec"]["selector"]["matchLabels"], tmpl["metadata"]["labels"])]
        assert len(covering) == 1, f"{name}: {len(covering)} PodDisruptionBudgets"
        for c in tmpl["spec"]["containers"]:
            r = c["resources"]
            assert {"cpu", "memory"} <= set(r["requests"]) and "memory" in r["limits"], f"{name}/{c['name']}"
            ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
            for kind in ("readinessProbe", "livenessProbe"):
                probe = c.get(kind)
                if c["name"] == "watch":
                    assert probe is None  # no listener to probe
                    continue
                assert probe, f"{name}/{c['name']} has no {kind}"
                target = probe.get("httpGet") or probe.get("tcpSocket")
                assert target["port"] in ports, f"{name}/{c['name']}: {kind} on an unnamed port"
                if c["name"] in ("gateway", "discovery", "router"):
                    assert probe["httpGet"]["path"] == "/health" and probe["httpGet"]["scheme"] == "HTTPS"
    # The ports the configs listen on are the ports the containers publish.
    disc = tomllib.loads(configmap_file(region, "discovery-config", "discovery.toml"))
    router = tomllib.loads(configmap_file(region, "router-config", "router.toml"))
    for name, listen in (("discovery", disc["discovery"]["listen"]), ("router", router["router"]["listen"])):
        c = one(region, "Deployment", name)["spec"]["template"]["spec"]["containers"][0]
        assert [p["containerPort"] for p in c["ports"]] == [int(listen.rsplit(":", 1)[1])]
    dns = one(region, "Deployment", "dns")["spec"]["template"]["spec"]["containers"][0]
    listen = next(a for a in dns["args"] if a.startswith("--listen=")).rsplit(":", 1)[1]
    assert {p["containerPort"] for p in dns["ports"]} == {int(listen)}
    assert {(p["port"], p["protocol"]) for p in one(region, "Service", "dns")["spec"]["ports"]} == {(53, "UDP"), (53, "TCP")}


# Key material the configs read, real enough for the binary to load at start.
@pytest.fixture(scope="module")
def material(edgeroute_bin, tmp_path_factory):
    d = tmp_path_factory.mktemp("material")

    def openssl(*a):
        subprocess.run(["openssl", *a], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(d / "ca.key"), "-out", str(d / "ca.crt"), "-subj", "/CN=test fleet CA", "-days", "2")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", str(d / "tls.key"), "-out", str(d / "tls.csr"), "-subj", "/CN=edgeroute")
    (d / "ext").write_text("subjectAltName=DNS:localhost,DNS:*.edgeroute.svc,IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", str(d / "tls.csr"), "-CA", str(d / "ca.crt"), "-CAkey", str(d / "ca.key"),
            "-CAcreateserial", "-out", str(d / "tls.crt"), "-days", "2", "-extfile", str(d / "ext"))
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(d / "seal.key"))
    openssl("pkey", "-in", str(d / "seal.key"), "-pubout", "-out", str(d / "seal.pub"))
    openssl("genpkey", "-algorithm", "ed25519", "-out", str(d / "ops.key"))
    openssl("pkey", "-in", str(d / "ops.key"), "-pubout", "-out", str(d / "ops.pub"))
    jwk = subprocess.run([edgeroute_bin, "token", "jwk", "--public-key", str(d / "ops.pub"), "--kid", "ops-1"],
                         check=True, capture_output=True, text=True).stdout
    jwk = json.loads(jwk)
    (d / "jwks.json").write_text(json.dumps(jwk if "keys" in jwk else {"keys": [jwk]}))
    bus = d / "bus"
    subprocess.run([edgeroute_bin, "bus", "credentials", "--discovery", "reader", "--out", str(bus)],
                   check=True, capture_output=True)
    files = {"ca.crt": d / "ca.crt", "tls.crt": d / "tls.crt", "tls.key": d / "tls.key",
             "seal.key": d / "seal.key", "seal.pub": d / "seal.pub", "jwks.json": d / "jwks.json",
             "token": None, "users.conf": None}
    return d, files, edgeroute_bin


def materialize(region, tmpl, container, root: Path, material):
    """The container's mounts under `root`, filled as the cluster would fill them (ConfigMaps
    from the render, Secrets from test key material), every absolute path in its config files
    and arguments moved under `root`, and the hosts its TOML configs name made `localhost` (the
    tests stay on loopback). Returns its arguments."""
    d, files, binary = material
    volumes = {v["name"]: v for v in tmpl["spec"]["volumes"]}
    mounts = container.get("volumeMounts", [])
    prefixes = sorted({m["mountPath"] for m in mounts}, key=len, reverse=True)

    moving = re.compile(r'(["=])(' + "|".join(map(re.escape, prefixes)) + r')(?=[/"]|$)', re.M)

    def move(text):  # one pass: a moved path is not moved again
        return moving.sub(lambda m: f"{m.group(1)}{root}{m.group(2)}", text) if prefixes else text

    def local(text):  # the fleet's host names (nodes, NATS, Triton) answer on loopback here
        return re.sub(r"(://)[A-Za-z0-9.-]+(?=:\d)", r"\1localhost", text)

    for m in mounts:
        target = root / m["mountPath"].lstrip("/")
        target.mkdir(parents=True, exist_ok=True)
        v = volumes.get(m["name"], {})  # absent: a volumeClaimTemplate (an empty disk)
        if "configMap" in v:
            for k, text in configmap_named(region, v["configMap"]["name"])["data"].items():
                text = move(text) if k.endswith((".toml", ".conf")) else text
                (target / k).write_text(local(text) if k.endswith(".toml") else text)
        elif "secret" in v:
            name = v["secret"]["secretName"]
            keys = SECRET_KEYS.get(name) or {f"{x}.nk" for x in [*node_ids(region), "discovery", "dns"]}
            items = v["secret"].get("items") or [{"key": k, "path": k} for k in sorted(keys)]
            for it in items:
                assert it["key"] in keys, f"{name} has no key {it['key']}"
                src = files.get(it["key"])
                if it["key"].endswith(".nk"):
                    src = d / "bus" / "reader.nk"
                out = target / it["path"]
                if src is None:
                    out.write_text("test-token-value\n")
                else:
                    shutil.copy(src, out)
                out.chmod(0o600)
    return [move(a) for a in container["args"]]


@pytest.mark.parametrize("region", REGIONS)
def test_every_server_starts_with_its_mounts_config_and_arguments(region, material):
    """Each gateway, discovery, router and GeoDNS container is run as the pod would run it:
    its arguments, its ConfigMap, Secrets of the right keys at the mounted paths. It must
    load its config and key files and answer: /health naming itself (https), or DNS."""
    binary = material[2]
    procs = []
    root = Path(tempfile.mkdtemp(prefix=f"edgeroute-pods-{region}-"))
    try:
        for name, tmpl, c in edgeroute_containers(region):
            if c["name"] == "watch":
                continue  # no listener; its flags are checked above
            croot = root / name.replace("/", "-")
            args = materialize(region, tmpl, c, croot, material)
            port = free_port()
            env = {**os.environ, "EDGEROUTE_LOG": "warn", "RUST_BACKTRACE": "0",
                   "EDGEROUTE_LISTEN": f"127.0.0.1:{port}"}
            if c["name"] == "router":
                cfg = Path(next(a for a in args if a.startswith("--config=")).split("=", 1)[1])
                cfg.write_text(re.sub(r'listen = "0.0.0.0:\d+"', f'listen = "127.0.0.1:{port}"', cfg.read_text()))
            if c["name"] == "dns":
                args = [a if not a.startswith("--listen=") else f"--listen=127.0.0.1:{port}" for a in args]
            log = open(croot / "log", "wb")
            procs.append((name, c["name"], port, subprocess.Popen([binary, *args], stdout=log, stderr=subprocess.STDOUT, env=env), croot / "log"))
        for name, cname, port, p, log in procs:
            deadline = time.time() + 20
            while True:
                assert p.poll() is None, f"{name}/{cname} exited {p.returncode}: {log.read_text()[-2000:]}"
                if cname == "dns":
                    if "listening on" in log.read_text():
                        break
                else:
                    try:
                        r = httpx.get(f"https://127.0.0.1:{port}/health", verify=False, timeout=2)
                        body = r.json()
                        disc = tomllib.loads(configmap_file(region, "discovery-config", "discovery.toml"))
                        router = tomllib.loads(configmap_file(region, "router-config", "router.toml"))
                        want = {"gateway": ("node_id", name.split("gateway-")[-1]),
                                "discovery": ("replica", disc["discovery"]["id"]),
                                "router": ("router", router["router"]["id"])}[cname]
                        assert body.get(want[0]) == want[1], body
                        break
                    except httpx.HTTPError:
                        pass
                assert time.time() < deadline, f"{name}/{cname} never answered: {log.read_text()[-2000:]}"
                time.sleep(0.1)
    finally:
        # Killed, not stopped: a gateway's graceful stop waits out its not_ready_delay_ms.
        for *_, p, _ in procs:
            p.kill()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


# --- the topology bus ---------------------------------------------------------------------

@pytest.mark.parametrize("region", REGIONS)
def test_the_nats_config_is_valid_for_a_real_nats_server(region, material, tmp_path):
    server = shutil.which("nats-server") or ("/usr/sbin/nats-server" if os.path.exists("/usr/sbin/nats-server") else None)
    if server is None:
        pytest.fail("nats-server is needed: scripts/test.sh installs it")
    d, _, binary = material
    nats = one(region, "StatefulSet", "nats")["spec"]["template"]
    c = nats["spec"]["containers"][0]
    args = materialize(region, nats, c, tmp_path, material)
    # users.conf as scripts/deploy.sh assembles it, from real `edgeroute bus credentials`.
    bus = tmp_path / "creds"
    blocks = []
    for n in node_ids(region):
        out = subprocess.run([binary, "bus", "credentials", "--node", n, "--region", region, "--out", str(bus)],
                             check=True, capture_output=True, text=True)
        blocks.append(out.stdout)
    (tmp_path / "etc/nats/users/users.conf").write_text("users: [\n" + "".join(blocks) + "]\n")
    conf = next(a for a in args if a.startswith("--config=")).split("=", 1)[1]
    assert f'store_dir: "{tmp_path}/data/' in Path(conf).read_text(), "JetStream's store is not on the data volume"
    r = subprocess.run([server, "-t", "-c", conf], env={**os.environ, "POD_NAME": "nats-0"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    text = Path(conf).read_text() + (tmp_path / "etc/nats/region/region.conf").read_text()
    assert f"name: {region}" in text and "verify: true" in text and "reject_unknown_cluster: true" in text
    # The check can fail: a gateway certificate that is not there.
    (tmp_path / "etc/nats/gateway-tls/tls.crt").unlink()
    assert subprocess.run([server, "-t", "-c", conf], env={**os.environ, "POD_NAME": "nats-0"},
                          capture_output=True, timeout=30).returncode != 0


def nats_settings(text):
    keys = ("max_payload", "max_pending", "max_connections", "max_memory_store", "max_file_store",
            "max_mem", "max_file", "max_streams", "max_consumers")
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*([a-z_]+)\s*:\s*([^#\s]+)", line)
        if m and m.group(1) in keys:
            out[m.group(1)] = m.group(2)
    account = re.search(r"accounts\s*\{\s*([A-Z_]+)\s*\{", text)
    out["account"] = account and account.group(1)
    return out


def test_the_k8s_bus_keeps_the_fleets_nats_settings():
    """deploy/k8s/base/nats/nats.conf and deploy/nats/nats-server.conf stay in step."""
    fleet = nats_settings((ROOT / "deploy" / "nats" / "nats-server.conf").read_text())
    k8s = nats_settings((K8S / "base" / "nats" / "nats.conf").read_text())
    assert len(fleet) == 10 and fleet == k8s


# --- monitoring: only metrics that exist, named as they are --------------------------------

def promql_exprs():
    rule = yaml.safe_load((K8S / "base" / "monitoring" / "prometheusrule.yaml").read_text())
    alerts = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    dash = json.loads((K8S / "base" / "monitoring" / "edgeroute-fleet.json").read_text())
    panels = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    variables = [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]
    return alerts, panels + variables


def exported(text):
    """Sample names a /metrics text has, and would have, from its TYPE lines."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()[:4]
            base = name[:-6] if name.endswith("_total") else name
            names |= {"counter": {f"{base}_total"}, "histogram": {f"{name}_bucket", f"{name}_sum", f"{name}_count"},
                      "gauge": {name}}.get(kind, {name})
        elif line and not line.startswith("#"):
            names.add(re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0))
    return names


def registered(metrics_rs: Path):
    """Sample names a prometheus_client registry in `metrics_rs` exports: its prefix, each
    `register("name", ..., m.field.clone())` and the field's type. A labelled family shows on
    /metrics only once it has a sample (a refusal, a probe): these are its names before that."""
    text = metrics_rs.read_text()
    prefix = re.search(r'Registry::with_prefix\("([a-z_]+)"\)', text).group(1)
    kinds = dict(re.findall(r"\b(?:pub )?([a-z_]+): (?:Family<[A-Za-z]+, )?(Counter|Gauge|Histogram)\b", text))
    names = set()
    for name, field in re.findall(r'\.register\(\s*"([a-z_]+)",.*?m\.([a-z_]+)\.clone\(\)', text, re.S):
        full = f"{prefix}_{name}"
        names |= {"Counter": {f"{full}_total"}, "Gauge": {full},
                  "Histogram": {f"{full}_bucket", f"{full}_sum", f"{full}_count"}}[kinds[field]]
    return names


def test_alerts_and_dashboard_use_only_metrics_the_binaries_export(start_node, start_proc, workdir):
    # A node whose backend fails every request: a labelled family shows only once it has a
    # sample, so one chat (a 5xx and a backend error) and one for an unknown model (refused).
    node, mint, _ = start_node('[backend]\nkind = "sim"\n[backend.sim.faults]\nerror_rate = 1.0\n')
    for model in ("sim-llama", "no-such-model"):
        r = httpx.post(f"{node}/v1/chat/completions", headers={"authorization": f"Bearer {mint()}"},
                       json={"model": model, "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
        assert r.status_code >= 400, r.text
    dport, rport = free_port(), free_port()
    (workdir / "d.toml").write_text(f'[discovery]\nlisten = "127.0.0.1:{dport}"\nallow_unauthenticated = true\n')
    start_proc(["discovery", "--config", str(workdir / "d.toml")], f"http://127.0.0.1:{dport}/health", "discovery")
    (workdir / "r.toml").write_text(f'[router]\nlisten = "127.0.0.1:{rport}"\ndiscovery = ["http://127.0.0.1:{dport}"]\n'
                                    'allow_unauthenticated = true\nallow_plaintext = true\n')
    start_proc(["router", "--config", str(workdir / "r.toml")], f"http://127.0.0.1:{rport}/health", "router")
    names = set()
    for url in (f"{node}/metrics", f"http://127.0.0.1:{dport}/metrics", f"http://127.0.0.1:{rport}/metrics"):
        r = httpx.get(url, timeout=10)
        assert r.status_code == 200, url
        names |= exported(r.text)
    assert {"edgeroute_node_ttft_seconds_bucket", "edgeroute_node_backend_errors_total",
            "edgeroute_node_rejected_total", "edgeroute_router_in_flight"} <= names
    # Families that have no sample yet in a quiet replica (refusals, probes, policy reloads):
    # from the registries' source, which must agree with what the binaries export.
    source = set()
    for crate in ("edgeroute-node", "edgeroute-discovery"):
        source |= registered(ROOT / "crates" / crate / "src" / "metrics.rs")
    running = {n for n in names if n.startswith(("edgeroute_node_", "edgeroute_discovery_"))}
    assert running <= source, f"the source parse misses {sorted(running - source)}"
    assert len(source) > len(running)
    names |= source

    alerts, panels = promql_exprs()
    assert len(alerts) >= 10 and len(panels) >= 20
    used = set()
    for expr in alerts + panels:
        metrics = set(re.findall(r"\b(edgeroute_[a-z0-9_]+)\b", expr))
        other = set(re.findall(r"\b([a-z_]+)\{", expr)) - metrics
        assert metrics or other == {"up"}, expr
        assert other <= {"up"}, f"{expr}: {other}"
        assert metrics <= names, f"{expr}: {sorted(metrics - names)} not exported"
        used |= metrics
    # Each component is on the dashboard.
    for prefix in ("edgeroute_node_", "edgeroute_discovery_", "edgeroute_router_"):
        assert any(m.startswith(prefix) for m in used), prefix
    # The check can fail: a misnamed metric is not exported.
    assert "edgeroute_node_ttft_ms_bucket" not in names


def test_the_dashboard_ships_in_a_configmap_grafana_picks_up():
    for region in REGIONS:
        cm = one(region, "ConfigMap", "edgeroute-grafana-dashboard")
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        dash = json.loads(cm["data"]["edgeroute-fleet.json"])
        assert dash["uid"] == "edgeroute-fleet"
        ids = [p["id"] for p in dash["panels"]]
        assert len(ids) == len(set(ids))
        for p in dash["panels"]:
            if p["type"] != "row":
                assert p["datasource"]["uid"] == "${datasource}" and p["targets"]
