"""Regenerate d_engine_sm/proto/*_pb2.py, *_pb2.pyi and storage_pb2_grpc.py.

Usage: python scripts/gen_proto.py [--out DIR]

Needs grpcio-tools (the `test` extra). tests/test_proto.py runs this into a
temporary directory and fails when the committed files differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ("common.proto", "storage.proto", "client.proto", "kv_snapshot.proto")


def generate(out: Path) -> None:
    from grpc_tools import protoc  # imported late: only this script needs it

    out.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{ROOT}",
        f"--python_out={out}",
        f"--pyi_out={out}",
        f"--grpc_python_out={out}",
        *(f"d_engine_sm/proto/{name}" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    # grpc stubs only for the file that declares a service
    for name in ("common_pb2_grpc.py", "client_pb2_grpc.py", "kv_snapshot_pb2_grpc.py"):
        (out / "d_engine_sm" / "proto" / name).unlink(missing_ok=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="output root (default: repo)")
    ns = parser.parse_args()
    generate(ns.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
