"""The committed gRPC modules are what the .proto files generate (regenerate: python -m fedrefine.runtime.protos)."""

from pathlib import Path

import pytest

PROTOS = Path(__file__).parent.parent / "src" / "fedrefine" / "runtime" / "protos"


def test_generated_code_matches_the_proto_files(tmp_path):
    pytest.importorskip("grpc_tools")
    from fedrefine.runtime.protos.__main__ import generate

    protos = generate(tmp_path)
    assert {p.stem for p in protos} >= {"participant", "registry"}
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            fresh = tmp_path / "fedrefine" / "runtime" / "protos" / f"{proto.stem}{suffix}"
            committed = PROTOS / f"{proto.stem}{suffix}"
            assert committed.read_text() == fresh.read_text(), f"{committed.name} is stale: run python -m fedrefine.runtime.protos"
