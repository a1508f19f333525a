"""A fake `kubectl` for tests/python/test_deploy.py: it records every call and answers as a
cluster with Kata, GPUs and the Prometheus Operator would, from a state file of what was
applied. `kustomize` runs the real kubectl (FAKE_KUBECTL_REAL).

Environment:
  FAKE_KUBECTL_LOG      JSON lines, one per call: {"argv": [...]}, and for an apply
                        "objects": ["Kind/name", ...] (and "stdin" when it read it)
  FAKE_KUBECTL_STATE    JSON file: the objects applied, by "kind/namespace/name"
  FAKE_KUBECTL_REAL     the real kubectl, for `kustomize`
Knobs (failures):
  FAKE_KUBECTL_CONTEXT=""               no current context (default "edge-test")
  FAKE_KUBECTL_NO_RUNTIMECLASS=1        RuntimeClass kata absent
  FAKE_KUBECTL_GPUS="4,4,0"             nvidia.com/gpu allocatable per machine ("0": none)
  FAKE_KUBECTL_NO_CRDS=1                no Prometheus Operator CRDs
  FAKE_KUBECTL_NEVER_READY=kind/name    that workload never finishes its rollout
  FAKE_KUBECTL_UNHEALTHY=node-id        that node's /health answers 503
  FAKE_KUBECTL_REFUSE_KIND=Kind         the API server refuses objects of that kind
"""

import json
import os
import sys

# Every call is a process start: it runs without site (`python -S`, test_deploy.py's wrapper),
# and what a call may not need is imported where needed; PyYAML from FAKE_KUBECTL_SITE.


def import_yaml():
    sys.path.extend(p for p in os.environ.get("FAKE_KUBECTL_SITE", "").split(os.pathsep) if p)
    import yaml

    return yaml

CLUSTER_SCOPED = {"Namespace", "RuntimeClass", "CustomResourceDefinition", "ClusterRole",
                  "ClusterRoleBinding", "PersistentVolume", "StorageClass"}
GROUPS = {"Deployment": "deployment.apps", "StatefulSet": "statefulset.apps",
          "PodDisruptionBudget": "poddisruptionbudget.policy",
          "NetworkPolicy": "networkpolicy.networking.k8s.io",
          "ServiceMonitor": "servicemonitor.monitoring.coreos.com",
          "PrometheusRule": "prometheusrule.monitoring.coreos.com"}
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}


def die(msg, code=1):
    sys.stderr.write(msg + "\n")
    sys.exit(code)


def load_state():
    path = os.environ["FAKE_KUBECTL_STATE"]
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {}


def save_state(state):
    with open(os.environ["FAKE_KUBECTL_STATE"], "w") as f:
        json.dump(state, f)


def key(kind, ns, name):
    return f"{kind}/{'' if kind in CLUSTER_SCOPED else ns}/{name}"


def split_globals(argv):
    """Takes --context, -n/--namespace, --request-timeout out of argv."""
    out, ns, i = [], None, 0
    while i < len(argv):
        a = argv[i]
        if a in ("--context", "-n", "--namespace", "--request-timeout"):
            if a in ("-n", "--namespace"):
                ns = argv[i + 1]
            i += 2
            continue
        if a.startswith(("--context=", "--request-timeout=")):
            i += 1
            continue
        if a.startswith("--namespace="):
            ns = a.split("=", 1)[1]
            i += 1
            continue
        out.append(a)
        i += 1
    return out, ns


def secret_yaml(args, ns):
    """`create secret generic|tls NAME ... --dry-run=client -o yaml`, as kubectl prints it
    (in JSON, which is YAML too)."""
    import base64
    kind, name, rest = args[0], args[1], args[2:]
    data, typ = {}, "Opaque"
    if kind == "generic":
        for a in rest:
            if a.startswith("--from-file="):
                spec = a.split("=", 1)[1]
                k, _, path = spec.partition("=") if "=" in spec else (os.path.basename(spec), "", spec)
                if not os.path.isfile(path):
                    die(f"error: error reading {path}: no such file or directory")
                if k in data:
                    die(f"error: cannot add key {k}, another key by that name already exists")
                data[k] = open(path, "rb").read()
            elif a not in ("--dry-run=client", "-o", "yaml"):
                die(f"fake kubectl: unexpected argument to create secret generic: {a}", 2)
    elif kind == "tls":
        typ = "kubernetes.io/tls"
        opts = dict(a.split("=", 1) for a in rest if a.startswith(("--cert=", "--key=")))
        for flag, k, marker in (("--cert", "tls.crt", b"CERTIFICATE"), ("--key", "tls.key", b"PRIVATE KEY")):
            path = opts.get(flag)
            if not path or not os.path.isfile(path):
                die(f"error: failed to load key pair open {path}: no such file or directory")
            body = open(path, "rb").read()
            if marker not in body:
                die("error: failed to load key pair tls: failed to find any PEM data in input")
            data[k] = body
    else:
        die(f"fake kubectl: unsupported secret type {kind}", 2)
    obj = {"apiVersion": "v1", "kind": "Secret", "type": typ,
           "metadata": {"name": name, "namespace": ns or "default", "creationTimestamp": None},
           "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
    return json.dumps(obj, indent=2) + "\n"


def apply(docs, state):
    refuse = os.environ.get("FAKE_KUBECTL_REFUSE_KIND")
    lines = []
    for d in docs:
        kind, meta = d["kind"], d["metadata"]
        ns = meta.get("namespace", "default")
        if kind in CRD_KINDS and os.environ.get("FAKE_KUBECTL_NO_CRDS") == "1":
            die(f'error: resource mapping not found for name: "{meta["name"]}": no matches for kind "{kind}" in version "{d["apiVersion"]}"')
        if kind == refuse:
            die(f'Error from server (Forbidden): error when creating "STDIN": {kind.lower()} "{meta["name"]}" is forbidden')
        if kind not in CLUSTER_SCOPED and key("Namespace", "", ns) not in state:
            die(f'Error from server (NotFound): error when creating "STDIN": namespaces "{ns}" not found')
        meta.pop("creationTimestamp", None)
        k = key(kind, ns, meta["name"])
        before = state.get(k)
        state[k] = d
        verb = "created" if before is None else ("unchanged" if before == d else "configured")
        lines.append(f"{GROUPS.get(kind, kind.lower())}/{meta['name']} {verb}")
    save_state(state)
    print("\n".join(lines))


def write_log(record):
    with open(os.environ["FAKE_KUBECTL_LOG"], "a") as f:
        f.write(json.dumps(record) + "\n")


def selects(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def health(path, state):
    import re
    import tomllib

    m = re.fullmatch(r"/api/v1/namespaces/([^/]+)/services/https:([^:/]+):(\d+)/proxy/health", path)
    if not m:
        die(f"fake kubectl: unsupported raw path {path}", 2)
    ns, svc_name, port = m.group(1), m.group(2), int(m.group(3))
    svc = state.get(key("Service", ns, svc_name))
    if svc is None:
        die(f'Error from server (NotFound): services "{svc_name}" not found')
    if port not in [p["port"] for p in svc["spec"]["ports"]]:
        die(f'Error from server (ServiceUnavailable): no endpoints available for service "{svc_name}:{port}"')
    never = os.environ.get("FAKE_KUBECTL_NEVER_READY", "")
    for k, obj in state.items():
        if obj["kind"] not in ("Deployment", "StatefulSet") or obj["metadata"].get("namespace") != ns:
            continue
        tmpl = obj["spec"]["template"]
        if not selects(svc["spec"].get("selector"), tmpl["metadata"]["labels"]):
            continue
        if f"{obj['kind'].lower()}/{obj['metadata']['name']}" == never:
            break
        name = tmpl["metadata"]["labels"].get("app.kubernetes.io/name")
        if name == "gateway":
            # The node id is what its mounted node.toml says.
            vol = next(v for v in tmpl["spec"]["volumes"] if v["name"] == "config")
            cm = state[key("ConfigMap", ns, vol["configMap"]["name"])]
            node = tomllib.loads(cm["data"]["node.toml"])["node"]
            if node["id"] == os.environ.get("FAKE_KUBECTL_UNHEALTHY"):
                break
            print(json.dumps({"status": "ready", "ready": True, "node_id": node["id"],
                              "region": node["region"], "models": [], "gpus": []},
                             separators=(",", ":")))
            return
        print(json.dumps({"status": "ready", "replica": svc_name}, separators=(",", ":")))
        return
    die("Error from server (ServiceUnavailable): the server is currently unable to handle the request")


def main():
    argv = sys.argv[1:]
    record = {"argv": argv}
    args, ns = split_globals(argv)
    docs = None
    if args[:2] == ["apply", "-f"] and len(args) == 3:
        yaml = import_yaml()
        if args[2] == "-":
            text = record["stdin"] = sys.stdin.read()
        else:
            with open(args[2]) as f:
                text = f.read()
        docs = [d for d in yaml.load_all(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d]
        record["objects"] = [f"{d['kind']}/{d['metadata']['name']}" for d in docs]
    write_log(record)

    if not args:
        die("fake kubectl: no command", 2)
    if args[0] == "kustomize":
        os.execv(os.environ["FAKE_KUBECTL_REAL"], [os.environ["FAKE_KUBECTL_REAL"], *args])
    context = os.environ.get("FAKE_KUBECTL_CONTEXT", "edge-test")
    if args[:2] == ["config", "current-context"]:
        if not context:
            die("error: current-context is not set")
        print(context)
        return
    if args[:2] == ["config", "get-contexts"]:
        if context:
            print(context)
        return
    if not context:
        die("The connection to the server localhost:8080 was refused - did you specify the right host or port?")
    state = load_state()
    if args[:2] == ["create", "secret"]:
        if "--dry-run=client" not in args:
            die("fake kubectl: a Secret is only created through `--dry-run=client -o yaml | apply`", 2)
        print(secret_yaml(args[2:], ns), end="")
        return
    if docs is not None:
        apply(docs, state)
        return
    if args[:3] == ["get", "runtimeclass", "kata"]:
        if os.environ.get("FAKE_KUBECTL_NO_RUNTIMECLASS") == "1":
            die('Error from server (NotFound): runtimeclasses.node.k8s.io "kata" not found')
        print("runtimeclass.node.k8s.io/kata")
        return
    if args[:2] == ["get", "nodes"]:
        gpus = os.environ.get("FAKE_KUBECTL_GPUS", "4,4,0").split(",")
        machines = [(f"machine-{i}", g) for i, g in enumerate(gpus)]
        out = args[args.index("-o") + 1] if "-o" in args else ""
        if out == "json":
            items = [{"metadata": {"name": n},
                      "status": {"allocatable": {"cpu": "32", "memory": "256Gi",
                                                 **({"nvidia.com/gpu": g} if g != "0" else {})}}}
                     for n, g in machines]
            print(json.dumps({"apiVersion": "v1", "kind": "List", "items": items}))
        elif out.startswith("jsonpath=") and "nvidia\\.com/gpu" in out:
            # kubectl prints nothing for a missing field.
            print("".join(f"{n} {g if g != '0' else ''}\n" for n, g in machines), end="")
        else:
            die(f"fake kubectl: unsupported output {out}", 2)
        return
    if args[:2] == ["get", "crd"]:
        if os.environ.get("FAKE_KUBECTL_NO_CRDS") == "1":
            die(f'Error from server (NotFound): customresourcedefinitions.apiextensions.k8s.io "{args[2]}" not found')
        print("".join(f"customresourcedefinition.apiextensions.k8s.io/{n}\n" for n in args[2:] if "." in n), end="")
        return
    if args[:2] == ["rollout", "status"]:
        kind, _, name = args[2].partition("/")
        kinds = {"deployment": "Deployment", "statefulset": "StatefulSet"}
        obj = state.get(key(kinds.get(kind, kind), ns or "default", name))
        if obj is None:
            die(f'Error from server (NotFound): {kind}s.apps "{name}" not found')
        if args[2] == os.environ.get("FAKE_KUBECTL_NEVER_READY"):
            print(f'Waiting for {kind} "{name}" rollout to finish: 0 of 1 updated replicas are available...')
            die("error: timed out waiting for the condition")
        print(f'{kind} "{name}" successfully rolled out')
        return
    if args[:2] == ["get", "--raw"]:
        health(args[2], state)
        return
    die(f"fake kubectl: unsupported call {argv}", 2)


if __name__ == "__main__":
    main()
