#!/usr/bin/env bash
# Optional bench peer: llama.cpp through llama-cpp-python, built from source with this
# machine's cmake/gcc (the PyPI release is an sdist). `make peers` runs it. Build time: about
# 20 min for the libraries on an idle 2-core machine; on the loaded 2-core machine of issue 13
# (nice 15 beside two training jobs) libggml + libllama took 17 min and libllama-common 2 h.
# LLAVA_BUILD=OFF skips the multimodal library (mtmd), which the text-only peers never load.
# pip caches the wheel, so a second run takes seconds. `dspark bench --methods llamacpp-ar,...`
# skips the peer with a message when it is not installed.
#   scripts/build-peers.sh            # into .venv (or: make peers)
#   VENV=path NICE=15 JOBS=1 scripts/build-peers.sh
set -euo pipefail
VENV=${VENV:-.venv}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)}
# GGML_NATIVE: build for this CPU (AVX512/AMX kernels); no curl, server, tests or examples.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAVA_BUILD=OFF"}
if "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed in $VENV"; exit 0
fi
start=$(date +%s)
nice -n "${NICE:-15}" "$VENV/bin/python" -m pip install -v "llama-cpp-python==$VERSION"
echo "llama-cpp-python $VERSION built in $(( $(date +%s) - start )) s"
