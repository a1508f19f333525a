#!/usr/bin/env bash
# Instructions per request (user space, valgrind's callgrind) of the simulator alone, of the
# edgeroute gateway in front of it and of nginx in front of it: the repeatable counterpart of
# `edgeroute-lab bench gateway`'s wall-clock figures (BENCHMARKS.md, "Instructions per
# request").
#
# Each target runs under callgrind (the simulator too, in every case); a client sends WARM
# requests, the counters are zeroed, N more requests go one at a time over one keep-alive
# connection, and the counters are dumped. The figure is the dump's total Ir divided by N.
# Kernel work (the syscalls, the same for every proxy) is not counted.
#
# TOOL=trace runs every process natively instead and times the proxy's critical path with
# `perf trace` (Debian's linux-perf): N requests, PAUSE_MS apart (caches as cold as under a
# light open-loop load), and for each the user-space time from reading the client's request
# to writing the upstream's, and from reading the upstream's answer to writing the client's
# (p50 and p90 of each, in µs; tracing adds its own cost to every syscall, not to these gaps).
#
# TOOL=cpu runs every process natively and reports the proxy's user and kernel CPU time per
# request (`/proc/PID/stat`, all threads): N requests back to back over one connection. The
# counters tick every 10 ms, so N=20000 resolves 0.5 µs per request.
#
# SIM_NATIVE=1 runs the simulator natively (its Ir/req reads 0). Under callgrind the simulator is
# as slow as the proxy, so how many pieces a streamed answer reaches the proxy in depends on
# which of the two is ahead, and a change to the proxy's timing changes how often it polls; run
# natively, the simulator's answer is whole before the proxy reads it, as it is outside
# valgrind (one `recvfrom` per answer, `perf trace` shows), and SSE figures compare.
#
# usage: scripts/gateway-callgrind.sh [EDGEROUTE_BIN]
#   env: N (default 1000), WARM (200), MODES ("json sse"), TARGETS ("direct gateway nginx"),
#        OUT (default /tmp/edgeroute-callgrind): the callgrind files, kept for callgrind_annotate;
#        TOOL (callgrind | trace | cpu), PAUSE_MS (trace: 2), SIM_NATIVE (0 | 1),
#        GW_LIMITS (lines added to the gateway's [limits], e.g. "http1_inline = false").
set -euo pipefail

BIN=${1:-./target/release/edgeroute}
N=${N:-1000}
WARM=${WARM:-200}
MODES=${MODES:-json sse}
TARGETS=${TARGETS:-direct gateway nginx}
OUT=${OUT:-/tmp/edgeroute-callgrind}
TOOL=${TOOL:-callgrind}
SIM_NATIVE=${SIM_NATIVE:-0}
PAUSE_MS=${PAUSE_MS:-$([ "$TOOL" = trace ] && echo 2 || echo 0)}
SIM_PORT=47101 GW_PORT=47102 NGINX_PORT=47103
mkdir -p "$OUT"
BIN=$(realpath "$BIN")
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT

wait_port() { # port
    for _ in $(seq 1 300); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; then
            return 0
        fi
        sleep 0.2
    done
    echo "nothing listens on port $1" >&2
    return 1
}

# callgrind NAME CMD...: starts CMD under callgrind, its pid in $LAST_PID.
callgrind() {
    local name=$1
    shift
    if [ "$TOOL" != callgrind ] || { [ "$SIM_NATIVE" = 1 ] && [[ $name == sim-* ]]; }; then
        "$@" >"$OUT/$name.log" 2>&1 &
        LAST_PID=$!
        PIDS+=("$LAST_PID")
        return
    fi
    valgrind --tool=callgrind --callgrind-out-file="$OUT/$name.%p.out" "$@" >"$OUT/$name.log" 2>&1 &
    LAST_PID=$!
    PIDS+=("$LAST_PID")
}

client() { # port n mode [token]
    PAUSE_MS=$PAUSE_MS python3 - "$@" <<'EOF'
import http.client, json, os, sys, time
pause = float(os.environ.get("PAUSE_MS", "0")) / 1000
port, n, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
token = sys.argv[4] if len(sys.argv) > 4 else None
stream = mode == "sse"
body = json.dumps({"model": "sim-llama",
                   "messages": [{"role": "user", "content": "Say hello in five words."}],
                   "max_tokens": 16, "stream": stream}, separators=(",", ":")).encode()
headers = {"content-type": "application/json"}
if token:
    headers["authorization"] = "Bearer " + token
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
for i in range(n):
    c.request("POST", "/v1/chat/completions", body=body, headers=headers)
    r = c.getresponse()
    data = r.read()
    if r.status != 200:
        sys.exit(f"request {i}: {r.status} {data[:300]!r}")
    if stream and not data.rstrip().endswith(b"data: [DONE]"):
        sys.exit(f"request {i}: stream without [DONE]: {data[-200:]!r}")
    if pause:
        time.sleep(pause)
c.close()
EOF
}

# Total Ir of the newest dump of callgrind process $1 named $2.
total_ir() {
    local f
    f=$(ls -t "$OUT/$2.$1.out".* | head -1)
    awk '/^totals:/ {print $2}' "$f"
}

# p50/p90 of the proxy's two critical-path gaps in a `perf trace` file (see the header).
trace_gaps() { # file
    python3 - "$1" <<'EOF'
import re, sys
pat = re.compile(r"^\s*([\d.]+) \(\s*([\d.]+) ms\):.*?(recvfrom|sendto|writev|epoll_wait)\((?:fd|epfd): (\d+)")
ev = [(float(m[1]), float(m[2]), m[3], int(m[4])) for m in map(pat.match, open(sys.argv[1])) if m]
req, ans = [], []
for i in range(1, len(ev)):
    # A request starts with the client read that follows an idle wait (> 1 ms).
    if not (ev[i - 1][2] == "epoll_wait" and ev[i - 1][1] > 1.0 and ev[i][2] == "recvfrom"):
        continue
    a = ev[i]
    rest = [e for e in ev[i + 1:i + 8] if e[2] != "epoll_wait"][:3]
    if len(rest) < 3:
        continue
    b, c, d = rest
    if b[2] in ("sendto", "writev") and c[2] == "recvfrom" and d[2] in ("sendto", "writev") and a[3] == d[3] and b[3] == c[3]:
        req.append((b[0] - a[0] - a[1]) * 1000)
        ans.append((d[0] - c[0] - c[1]) * 1000)
if not req:
    sys.exit("no request found in the trace")
q = lambda x, p: sorted(x)[int(p * (len(x) - 1))]
print(f"{len(req):6d} {q(req, .5):8.0f} {q(req, .9):8.0f} {q(ans, .5):8.0f} {q(ans, .9):8.0f}")
EOF
}

secret="$OUT/hs256.secret"
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$secret"
chmod 600 "$secret"
token=$("$BIN" token mint --secret-file "$secret" --sub bench --scope inference | tail -1)

gateway_toml() {
    cat <<EOF
[node]
id = "bench-gw"
region = "local"
listen = "127.0.0.1:$GW_PORT"
worker_threads = 1

[limits]
max_concurrency = 100000
rate_limit_per_s = 1000000
rate_limit_burst = 1000000
max_connections_per_source = 512
${GW_LIMITS:-}

[auth]
hs256_secret_file = "$secret"

[backend]
kind = "openai"
url = "http://127.0.0.1:$SIM_PORT"

[[backend.models]]
id = "sim-llama"
EOF
}

nginx_conf() {
    cat <<EOF
worker_processes 1;
daemon off;
master_process off;
pid $OUT/nginx/nginx.pid;
error_log $OUT/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $OUT/nginx/client_body;
    proxy_temp_path $OUT/nginx/proxy;
    fastcgi_temp_path $OUT/nginx/fastcgi;
    uwsgi_temp_path $OUT/nginx/uwsgi;
    scgi_temp_path $OUT/nginx/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream sim { server 127.0.0.1:$SIM_PORT; keepalive 256; keepalive_requests 1000000; keepalive_timeout 300s; }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://sim;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }
    }
}
EOF
}

# User and kernel clock ticks of process $1 (fields 14 and 15 of /proc/PID/stat; the command
# name, field 2, has no blank in any process this script starts).
cpu_ticks() { awk '{ print $14, $15 }' "/proc/$1/stat"; }

if [ "$TOOL" = trace ]; then
    TARGETS=${TARGETS/direct/}
    printf '%-8s %-5s %6s %8s %8s %8s %8s\n' target mode n "req p50" "req p90" "ans p50" "ans p90"
elif [ "$TOOL" = cpu ]; then
    TARGETS=${TARGETS/direct/}
    printf '%-8s %-5s %6s %14s %14s\n' target mode n "user µs/req" "kernel µs/req"
else
    printf '%-8s %-5s %14s %14s %14s\n' target mode "sim Ir/req" "proxy Ir/req" "total Ir/req"
fi
for target in $TARGETS; do
    for mode in $MODES; do
        PIDS=()
        callgrind "sim-$target-$mode" "$BIN" sim --listen 127.0.0.1:$SIM_PORT --zero-latency
        sim_pid=$LAST_PID
        wait_port $SIM_PORT
        proxy_pid=
        port=$SIM_PORT
        tok=
        case $target in
            gateway)
                gateway_toml >"$OUT/gateway.toml"
                callgrind "gateway-$mode" "$BIN" node --config "$OUT/gateway.toml"
                proxy_pid=$LAST_PID port=$GW_PORT tok=$token
                ;;
            nginx)
                mkdir -p "$OUT/nginx"
                nginx_conf >"$OUT/nginx/nginx.conf"
                callgrind "nginx-$mode" /usr/sbin/nginx -p "$OUT/nginx" -c "$OUT/nginx/nginx.conf" -e "$OUT/nginx/error.log"
                proxy_pid=$LAST_PID port=$NGINX_PORT
                ;;
        esac
        wait_port $port
        client $port "$WARM" "$mode" $tok
        if [ "$TOOL" = cpu ]; then
            hz=$(getconf CLK_TCK)
            before=$(cpu_ticks "$proxy_pid")
            client $port "$N" "$mode" $tok
            after=$(cpu_ticks "$proxy_pid")
            echo "$before $after" | awk -v n="$N" -v hz="$hz" -v t="$target" -v m="$mode" \
                '{ printf "%-8s %-5s %6d %14.1f %14.1f\n", t, m, n, ($3 - $1) * 1e6 / hz / n, ($4 - $2) * 1e6 / hz / n }'
            cleanup
            continue
        fi
        if [ "$TOOL" = trace ]; then
            perf trace -p "$proxy_pid" -e recvfrom,sendto,writev,epoll_wait -o "$OUT/$target-$mode.trace" &
            tracer=$!
            sleep 1
            client $port "$N" "$mode" $tok
            sleep 0.3
            kill -INT $tracer
            wait $tracer 2>/dev/null || true
            printf '%-8s %-5s %s\n' "$target" "$mode" "$(trace_gaps "$OUT/$target-$mode.trace")"
            cleanup
            continue
        fi
        [ "$SIM_NATIVE" = 1 ] || callgrind_control -z $sim_pid >/dev/null 2>&1
        [ -n "$proxy_pid" ] && callgrind_control -z $proxy_pid >/dev/null 2>&1
        client $port "$N" "$mode" $tok
        [ "$SIM_NATIVE" = 1 ] || callgrind_control -d $sim_pid >/dev/null 2>&1
        [ -n "$proxy_pid" ] && callgrind_control -d $proxy_pid >/dev/null 2>&1
        sim_ir=0
        [ "$SIM_NATIVE" = 1 ] || sim_ir=$(total_ir $sim_pid "sim-$target-$mode")
        proxy_ir=0
        case $target in
            gateway) proxy_ir=$(total_ir $proxy_pid "gateway-$mode") ;;
            nginx) proxy_ir=$(total_ir $proxy_pid "nginx-$mode") ;;
        esac
        printf '%-8s %-5s %14d %14d %14d\n' "$target" "$mode" $((sim_ir / N)) $((proxy_ir / N)) \
            $(((sim_ir + proxy_ir) / N))
        cleanup
    done
done
