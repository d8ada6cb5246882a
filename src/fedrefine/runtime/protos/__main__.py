"""Regenerate the committed ``*_pb2.py`` / ``*_pb2_grpc.py`` modules from every ``.proto`` here (needs grpcio-tools)."""

from __future__ import annotations

import sys
from pathlib import Path


def generate(out_dir: Path | None = None) -> list[Path]:
    """Run protoc on each ``.proto`` of this package; write into ``out_dir`` (default: the source tree)."""
    from grpc_tools import protoc

    here = Path(__file__).resolve().parent
    src = here.parents[2]  # .../src, so that generated imports read `from fedrefine.runtime.protos import ...`
    out = src if out_dir is None else out_dir
    protos = sorted(here.glob("*.proto"))
    for proto in protos:
        args = ["protoc", f"-I{src}", f"--python_out={out}", f"--grpc_python_out={out}", str(proto.relative_to(src))]
        if protoc.main(args) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    return protos


if __name__ == "__main__":
    for proto in generate(Path(sys.argv[1]) if len(sys.argv) > 1 else None):
        print(f"generated from {proto.name}")
