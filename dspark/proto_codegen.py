"""Generate the gRPC/protobuf Python modules from `proto/` (`python -m dspark.proto_codegen`).

`protoc -I proto` plus output to the repository root makes `proto/dspark/v1/x.proto` land
in `dspark/v1/x_pb2.py`, so the generated imports read `from dspark.v1 import x_pb2`. The
generated files are checked in; `tests/unit/test_proto_codegen.py` regenerates them into a
temporary directory and fails if they differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = REPO_ROOT / "proto"


def proto_files(proto_dir: Path = PROTO_DIR) -> list[Path]:
    return sorted(proto_dir.rglob("*.proto"))


def generate(out_dir: Path = REPO_ROOT, proto_dir: Path = PROTO_DIR) -> list[Path]:
    """Run protoc on every `.proto` under `proto_dir`; returns the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    sources = [str(p.relative_to(proto_dir)) for p in proto_files(proto_dir)]
    args = ["protoc", f"-I{proto_dir}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {sources}")
    return [out_dir / Path(src).with_suffix("").parent / f"{Path(src).stem}{suffix}"
            for src in sources for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT, help="output root (default: repo)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
