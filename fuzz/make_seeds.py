import base64, hashlib, hmac, json, os, struct
root = "corpus"
def w(target, name, data):
    d = os.path.join(root, target); os.makedirs(d, exist_ok=True)
    if isinstance(data, str): data = data.encode()
    open(os.path.join(d, "seed-" + name), "wb").write(data)

# chat_request
w("chat_request", "minimal.json", '{"model":"m","messages":[{"role":"user","content":"hi"}]}')
w("chat_request", "full.json", json.dumps({"model":"smollm2","messages":[{"role":"system","content":"be brief"},{"role":"user","content":[{"type":"text","text":"hello"},{"type":"image_url","image_url":{"url":"data:x"}}]},{"role":"assistant","content":None,"tool_calls":[]},{"role":"tool","content":"42","name":"calc"}],"stream":True,"stream_options":{"include_usage":True},"max_tokens":16,"max_completion_tokens":32,"temperature":0.7,"top_p":0.9,"n":1,"seed":7,"stop":["\n","END"],"continue_final_message":False,"tools":[{"type":"function"}],"logit_bias":{"50256":-100},"chat_template_kwargs":{"x":1},"backend_knob":True}))
w("chat_request", "over-ceilings.json", '{"model":"m","messages":[{"role":"user","content":"x"}],"n":9,"max_tokens":40000}')
w("chat_request", "invalid.json", '{"model":" ","messages":[],"temperature":3,"top_p":-1,"n":0,"stream_options":{}}')
w("chat_request", "type-error.json", '{"model":"m","messages":[{"role":"robot","content":1}],"stop":"x"}')
w("chat_request", "truncated.json", '{"model":"m","messages":[{"role":"user","content":"h')

# sse: 2 bytes max_event, 1 byte chunk seed, stream
def sse(max_event, seed, stream): return struct.pack("<HB", max_event - 16, seed) + stream
w("sse", "openai.bin", sse(1024, 7, b'data: {"a":1}\n\n: keep-alive\n\ndata:{"b":2}\r\n\r\ndata: [DONE]\n\n'))
w("sse", "multiline.bin", sse(64, 3, b'event: x\nid: 1\ndata: a\ndata: b\n\nretry: 5\r\rdata: {"c"'))
w("sse", "error-event.bin", sse(256, 9, b'data: {"x":1}\n\ndata: { "error": {"message":"boom"}}\n\ndata: after\n\n'))
w("sse", "oversized.bin", sse(16, 1, b'data: ' + b'0123456789' * 8 + b'\n\ndata: [DONE]\n\n'))
w("sse", "done-then-more.bin", sse(512, 200, b'data: [DONE]\n\ndata: [DONE]\ndata: x\n\n\r\n\r\ndata:  [DONE]\n\n'))

# jwt
secret = b"fuzzing-secret-at-least-32-bytes-long"
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=")
def token(header, claims):
    s = b64(json.dumps(header, separators=(",",":")).encode()) + b"." + b64(json.dumps(claims, separators=(",",":")).encode())
    return s + b"." + b64(hmac.new(secret, s, hashlib.sha256).digest())
good = token({"alg":"HS256","typ":"JWT"}, {"sub":"tenant-a","exp":1800000000,"aud":"edgeroute","scope":"chat models:read","iat":1600000000})
w("jwt", "bearer-valid.txt", b"\x00Bearer " + good)
w("jwt", "bearer-expired.txt", b"\x00bearer " + token({"alg":"HS256"}, {"sub":"t","exp":1600000000,"aud":["x","edgeroute"]}))
w("jwt", "alg-none.txt", b"\x00" + b64(b'{"alg":"none"}') + b"." + b64(b'{"sub":"t","exp":1800000000}') + b".")
w("jwt", "bad-sig.txt", b"\x00Bearer " + good[:-4] + b"AAAA")
w("jwt", "signed-claims.bin", b"\x01" + b'{"alg":"HS256","typ":"JWT"}' + b"\xff" + b'{"sub":"t","exp":1800000000,"nbf":1699999990,"aud":"edgeroute","iss":"me","scp":["chat","admin"]}')
w("jwt", "signed-crit.bin", b"\x01" + b'{"alg":"HS256","crit":["b64"],"kid":null}' + b"\xff" + b'{"sub":"","exp":-1,"aud":7}')
w("jwt", "signed-default-header.bin", b"\x01" + b'{"sub":"t","exp":1700000010,"scope":["x"]}')
w("jwt", "jwks.json", b"\x02" + json.dumps({"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k1","alg":"EdDSA","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"},{"kty":"RSA","kid":"r1","use":"sig","n":"sXch","e":"AQAB"},{"kty":"EC","crv":"P-256","kid":"e1"},{"kty":"RSA","use":"enc"}]}).encode())

# headers
for i, s in enumerate(["q=2;f=5;c=16;t=41", "q=1; f=2 ;z=9;;", "q=+7;c=4294967296",
                       "reason=drain; deadline_ms=30000; to=tor-2", "reason=unload; deadline_ms=0; model=llama3:8b; x=1",
                       "reason= a=b ; deadline_ms=1", "side=backend; retry=yes", "side=node;retry=no;later=1",
                       "side=moon; retry=yes", "retry=maybe"]):
    w("headers", f"{i}.txt", s)

# bus
ev = lambda **kw: json.dumps({**dict(node_id="tor-1", region="ca_east", epoch=1, seq=1, at_ms=0), **kw}, separators=(",",":"))
subj = "edgeroute.topology.ca_east.tor-1"
snap = {"node_id":"tor-1","region":"ca_east","url":"http://10.0.0.1:8080","epoch":1,"seq":3,"at_ms":5,"liveness":"up","models":[{"model":"m1","gpu":"g0","state":"ready"}]}
lines = [
 f"e {subj} " + ev(kind={"type":"node_up","url":"http://10.0.0.1:8080"}),
 f"e {subj} " + ev(seq=2, kind={"type":"model_loading","model":"m1","gpu":"g0"}),
 f"e {subj} " + ev(seq=3, kind={"type":"model_ready","model":"m1","gpu":None}),
 f"e {subj} " + ev(seq=3, kind={"type":"heartbeat"}),
 f"e {subj} " + ev(seq=5, kind={"type":"node_draining","deadline_ms":30000,"to":"tor-2"}),
 "s tor-1 " + json.dumps(snap, separators=(",",":")),
 "x 1500",
 f"e {subj} " + ev(epoch=2, seq=1, kind={"type":"model_failed","model":"m2","gpu":None,"reason":"oom"}),
 "t",
 f"e edgeroute.topology.other.tor-1 " + ev(seq=2, kind={"type":"node_down"}),
]
w("bus_message", "sequence.txt", "\n".join(lines) + "\n")
w("bus_message", "drain.txt", "\n".join([
 f"e {subj} " + ev(kind={"type":"model_ready","model":"a","gpu":None}),
 f"e {subj} " + ev(seq=2, kind={"type":"model_draining","model":"a","gpu":None,"deadline_ms":100}),
 f"e {subj} " + ev(seq=3, kind={"type":"model_unloading","model":"a","gpu":None}),
 f"e {subj} " + ev(seq=4, kind={"type":"model_unloaded","model":"a","gpu":None}),
 f"e {subj} " + ev(seq=5, kind={"type":"node_ready"}),
 "s tor-1 " + json.dumps(dict(snap, seq=1, liveness="draining", drain_deadline_ms=9)),
 "s tor-2 " + json.dumps(snap),
 "x 0"]) + "\n")
w("bus_message", "malformed.txt", f"e {subj} {{\"seq\":1}}\ns tor-1 {{\ne a.b.c {{}}\n")

# health
health = {"status":"ready","ready":True,"node_id":"van-1","region":"ca_west","version":"0.1.0","uptime_s":12,
  "models":[{"id":"m1","state":"ready","gpu":"g0"},{"id":"m2","state":"loading"}],
  "gpus":[{"id":"g0","models":["m1"],"slots":4,"busy":1,"queued":0,"utilization":0.25,"memory_used_mb":100,"memory_total_mb":8000,"availability":0.75}],
  "pipelines":[{"id":"voice","models":["m1","m2"],"servable":False,"availability":0.0,"missing":["m2"]}],
  "queue_depth":0,"in_flight":1,"capacity":16,"window_s":60,
  "ttft_ms":{"p50":40.5,"p99":120.0,"samples":50},"latency_ms":{"p50":400.0,"p99":900.0,"samples":50},
  "error_rate":0.02,"requests_in_window":50,"cost_per_1k":0.4}
w("health", "ready.json", json.dumps(health))
w("health", "draining.json", json.dumps(dict(health, status="draining", ready=False, error_rate=7.5, requests_in_window=18446744073709551615,
   ttft_ms={"p50":-1e308,"p99":1e308,"samples":18446744073709551615}, drain={"reason":"drain","deadline_ms":30000,"to":"tor-2","drained":False}, pipelines=[])))
w("health", "saturated-min.json", json.dumps({k: v for k, v in dict(health, status="saturated", gpus=[], models=[]).items() if k not in ("pipelines","cost_per_1k")}))

# hub
sha = "0123456789abcdef0123456789abcdef01234567"
info = {"sha": sha, "siblings": [
  {"rfilename":"config.json","size":512},
  {"rfilename":"model.safetensors","size":1000,"lfs":{"sha256":"AB"*32,"size":1000}},
  {"rfilename":"tokenizer.json","size":2000},
  {"rfilename":"README.md","size":10},
  {"rfilename":"pytorch_model.bin","size":1000}], "other":{"x":1}}
w("hub_manifest", "safetensors.txt", f"org/model\nmain\n*.safetensors,*.json\n" + json.dumps(info))
w("hub_manifest", "gguf-pinned.txt", f"TheOrg/Some-Model.GGUF\n{sha.upper()}\nmodel.Q4_K_M.gguf\n" + json.dumps({"sha":sha,"siblings":[{"rfilename":"model.Q4_K_M.gguf","size":4096,"lfs":{"sha256":"ab"*32}},{"rfilename":"sub/dir/x.json","size":1}]}))
w("hub_manifest", "hostile.txt", "bad//id\nrefs/pr/1\n../x\n" + json.dumps({"sha":sha,"siblings":[{"rfilename":"a/../../etc/passwd","size":1},{"rfilename":"a","size":1},{"rfilename":"a/b.gguf","size":1}]}))
w("hub_manifest", "pickle-only.txt", "model\nv1.0\n*\n" + json.dumps({"sha":sha,"siblings":[{"rfilename":"model.bin","size":1},{"rfilename":"config.json","size":18446744073709551615},{"rfilename":"x.safetensors","size":18446744073709551615}]}))
w("hub_manifest", "paths.txt", "org/model\nmain\n*.gguf\n" + "config.json\nsub/model.gguf\n/abs\nC:\\x\n" + sha + "\n")

# chat_template
def gguf(entries):
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    for k, ty, val in entries:
        out += struct.pack("<Q", len(k)) + k.encode() + struct.pack("<I", ty) + val
    return out
S = lambda s: struct.pack("<Q", len(s.encode())) + s.encode()
tmpl = "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"
sample = gguf([("general.name", 8, S("tiny")), ("general.alignment", 4, struct.pack("<I", 32)),
  ("tokenizer.ggml.scores", 9, struct.pack("<IQ", 6, 3) + b"\0" * 12),
  ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, 3) + S("<unk>") + S("<s>") + S("</s>")),
  ("tokenizer.ggml.bos_token_id", 4, struct.pack("<I", 1)), ("tokenizer.ggml.eos_token_id", 5, struct.pack("<i", 2)),
  ("tokenizer.chat_template", 8, S(tmpl))])
w("chat_template", "gguf-sample.bin", b"\x00" + sample)
w("chat_template", "gguf-v2-negative-id.bin", b"\x02" + b"GGUF" + struct.pack("<IQQ", 2, 1, 2) + struct.pack("<Q", 27) + b"tokenizer.ggml.bos_token_id" + struct.pack("<I", 11) + struct.pack("<q", -1) + struct.pack("<Q", 9) + b"x.strings" + struct.pack("<IIQ", 9, 8, 2) + S("a") + S("b"))
w("chat_template", "gguf-bad-magic.bin", b"\x00GGML\x03\x00\x00\x00")
msgs = lambda *ms: b"\x00".join(bytes([r]) + t.encode() for r, t in ms)
w("chat_template", "smollm2-continue.bin", b"\x11\x00" + msgs((2, "Name one city in Canada."), (3, "Toronto is ")))
w("chat_template", "llama3-trim.bin", b"\x01\x01" + msgs((0, "sys"), (2, "hi"), (3, "  Toronto \n")))
w("chat_template", "mistral-parts.bin", b"\x13\x02" + msgs((2, "a\x01b"), (3, "x\x01 y ")))
w("chat_template", "tool-role.bin", b"\x01\x01" + msgs((4, "42"), (3, "ok")))

# dns_query: 1 byte (bit 0: TCP, bit 1: an IPv6 source), then a DNS message
def qname(name): return b"".join(bytes([len(l)]) + l.encode() for l in name.split(".") if l) + b"\0"
def dnsq(name, qtype, opt=b"", qd=1, flags=0x0100):
    return struct.pack(">HHHHHH", 0x1234, flags, qd, 0, 0, 1 if opt else 0) + qname(name) + struct.pack(">HH", qtype, 1) + opt
def opt(payload=1232, options=b"", version=0): return b"\0" + struct.pack(">HHBBHH", 41, payload, 0, version, 0, len(options)) + options
def ecs(family, source, addr): return struct.pack(">HHHBB", 8, 4 + len(addr), family, source, 0) + addr
w("dns_query", "a.bin", b"\x00" + dnsq("discovery.edge.test", 1))
w("dns_query", "ecs-v4.bin", b"\x00" + dnsq("api.edge.test", 1, opt(options=ecs(1, 24, bytes([198, 51, 100])))))
w("dns_query", "ecs-v6-tcp.bin", b"\x03" + dnsq("DisCovery.Edge.Test", 28, opt(options=ecs(2, 56, bytes(7)))))
w("dns_query", "srv-512.bin", b"\x00" + dnsq("_edgeroute._tcp.discovery.edge.test", 33, opt(payload=512)))
w("dns_query", "any.bin", b"\x00" + dnsq("edge.test", 255))
w("dns_query", "badvers.bin", b"\x00" + dnsq("edge.test", 6, opt(version=1)))
w("dns_query", "two-questions.bin", b"\x00" + dnsq("api.edge.test", 1, qd=2))
w("dns_query", "pinned-txt.bin", b"\x02" + dnsq("mtl.discovery.edge.test", 16))

# upstream_answer: 1 byte read-size seed, 1 byte (bit 0: a HEAD request), then the answer
w("upstream_answer", "json.bin", b"\x07\x00" + b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}HTTP/1.1')
w("upstream_answer", "sse-chunked.bin", b"\x2a\x00" + b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\nd\r\ndata: token\n\n\r\n10;ext=1\r\ndata: [DONE]\n\n\n\n\r\n0\r\nx-t: 1\r\n\r\n")
w("upstream_answer", "interim-204.bin", b"\x03\x00" + b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n")
w("upstream_answer", "close-delimited.bin", b"\x11\x00" + b"HTTP/1.0 503 Service Unavailable\r\nretry-after: 2\r\n\r\n{\"error\":\"busy\"}")
w("upstream_answer", "head.bin", b"\x05\x01" + b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n")
w("upstream_answer", "te-and-cl.bin", b"\x09\x00" + b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")

# server_request: 1 byte read-size seed, 1 byte buffer size (64 << (b % 9)), then the stream
w("server_request", "chat.bin", b"\x07\x08" + b'POST /v1/chat/completions HTTP/1.1\r\nhost: n\r\nauthorization: Bearer t\r\ncontent-type: application/json\r\ncontent-length: 21\r\n\r\n{"model":"sim-llama"}GET /health HTTP/1.1\r\nConnection: close\r\n\r\n')
w("server_request", "chunked.bin", b"\x2a\x08" + b"GET / HTTP/1.1\r\n\r\nPOST /x HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
w("server_request", "too-large.bin", b"\x03\x00" + b"POST / HTTP/1.1\r\ncontent-length: 100\r\n\r\n" + b"a" * 100)
w("server_request", "h2-preface.bin", b"\x05\x04" + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
w("server_request", "two-lengths.bin", b"\x09\x04" + b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab")
