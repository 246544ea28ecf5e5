#!/usr/bin/env bash
# Optional bench peer: llama.cpp through llama-cpp-python, built from source with this
# machine's cmake/gcc (the PyPI release is an sdist): ~20 min on an idle 2-core machine, hours on a loaded one;
# pip caches the wheel, so a second run takes seconds. `dspark bench --methods llamacpp-ar,...`
# skips the peer with a message when it is not installed.
#   scripts/build-peers.sh            # into .venv
#   VENV=path NICE=15 JOBS=1 scripts/build-peers.sh
set -euo pipefail
VENV=${VENV:-.venv}
VERSION=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(nproc)}
# GGML_NATIVE: build for this CPU (AVX512/AMX kernels); no curl, server, tests or examples.
export CMAKE_ARGS=${CMAKE_ARGS:-"-DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF"}
if "$VENV/bin/python" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
  echo "llama-cpp-python $VERSION already installed in $VENV"; exit 0
fi
start=$(date +%s)
nice -n "${NICE:-15}" "$VENV/bin/python" -m pip install -v "llama-cpp-python==$VERSION"
echo "llama-cpp-python $VERSION built in $(( $(date +%s) - start )) s"
