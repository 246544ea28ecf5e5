#!/usr/bin/env bash
# The GPU suite (tests/gpu, marker `gpu`) on ONE CUDA device, in well under 8 minutes:
#   engine forward and verify forward on CUDA against CPU float32 (4 model families), greedy
#   speculation on CUDA equal to plain decoding (n-gram, draft model, a half-right drafter),
#   CUDA vs CPU greedy tokens, seeded sampling on the device, and the KV transport between
#   two processes with CUDA caches: NCCL where NCCL accepts two ranks on one GPU (it
#   refuses by design: the test then says so and skips), gloo through host memory always.
#
#   scripts/gpu-check.sh            # from the repository root or anywhere
#   PYTHON=/path/to/python scripts/gpu-check.sh
#
# Needs only torch (with CUDA), pytest and protobuf >= the generated code's version
# (dspark/v1/*_pb2.py); the repo itself is used in place (PYTHONPATH), not installed. On a
# machine without network, put wheels of anything missing in .whl/ (git-ignored via
# .git/info/exclude): they are installed into a scratch directory first. The whole run is
# capped at 470 s; the report lists the slowest tests and every skip with its reason.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -z "${PYTHON:-}" ]; then  # the first Python whose torch sees a GPU
  for candidate in .venv/bin/python python3; do
    if "$candidate" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
      PYTHON=$candidate
      break
    fi
  done
  PYTHON=${PYTHON:-python3}
fi
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/dspark-gpu-site .whl/*.whl
  export PYTHONPATH="/tmp/dspark-gpu-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}" PYTHONUNBUFFERED=1

"$PYTHON" - <<'PY'
import importlib, sys
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, devices {torch.cuda.device_count()}", flush=True)
if not torch.cuda.is_available():
    sys.exit("gpu-check: torch sees no CUDA device")
print("device 0:", torch.cuda.get_device_name(0))
if torch.distributed.is_nccl_available():
    print("NCCL", ".".join(map(str, torch.cuda.nccl.version())))
missing = []
for mod in ("pytest", "dspark.engine.engine", "dspark.kv.transport", "dspark.kv.dist_channel"):
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001 - report every missing piece at once
        missing.append(f"{mod}: {type(e).__name__}: {e}")
if missing:
    sys.exit("gpu-check: cannot import\n  " + "\n  ".join(missing)
             + "\n(carry wheels of the missing packages, e.g. protobuf, in .whl/)")
PY

exec timeout 470 "$PYTHON" -m pytest tests/gpu -m gpu -q -rs -p no:cacheprovider \
  -o addopts="--import-mode=importlib" --durations=10 "$@"
