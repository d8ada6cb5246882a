"""The committed gRPC modules are what the .proto files generate (regenerate: python -m fedrefine.runtime.protos).

The generators stamp their own version into the code (``GRPC_GENERATED_VERSION = '1.85.1'``, ``# Protobuf Python
Version: 7.35.1`` and the runtime check's numbers): a grpcio-tools release changes those lines and nothing else.
The stamps are compared apart: what the protos say must match exactly, and each stamp must be a version the
package's own lower bound admits (grpcio / protobuf refuse to import code stamped newer than themselves).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PROTOS = ROOT / "src" / "fedrefine" / "runtime" / "protos"
STAMP = "<generator version>"
#: Each generator's version stamp: grpc's constant, protobuf's header comment and its runtime check's numbers.
STAMPS = (
    re.compile(r"(GRPC_GENERATED_VERSION = ')([0-9.]+)(')"),
    re.compile(r"(# Protobuf Python Version: )([0-9.]+)()"),
    re.compile(r"(_runtime_version\.Domain\.PUBLIC,\n)(\s*\d+,\n\s*\d+,\n\s*\d+,)(\n)"),
)


def without_stamps(code: str) -> str:
    """Generated code with every generator version stamp replaced by one placeholder."""
    for pattern in STAMPS:
        code = pattern.sub(lambda m: m.group(1) + STAMP + m.group(3), code)
    return code


def stamped_versions(code: str) -> dict[str, tuple[int, ...]]:
    """The versions stamped into generated code: ``grpc`` and/or ``protobuf``."""
    found = {}
    if match := STAMPS[0].search(code):
        found["grpc"] = tuple(int(p) for p in match.group(2).split("."))
    if match := STAMPS[2].search(code):
        found["protobuf"] = tuple(int(p) for p in re.findall(r"\d+", match.group(2)))
    return found


def lower_bounds() -> dict[str, tuple[int, ...]]:
    """pyproject's ``>=`` bound of grpcio and protobuf."""
    tomllib = pytest.importorskip("tomllib")
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    bounds = {}
    for requirement in dependencies:
        if match := re.fullmatch(r"(grpcio|protobuf)\s*>=\s*([0-9.]+).*", requirement):
            bounds[match.group(1).replace("grpcio", "grpc")] = tuple(int(p) for p in match.group(2).split("."))
    return bounds


def committed_modules() -> list[Path]:
    return sorted(PROTOS.glob("*_pb2*.py"))


def test_generated_code_matches_the_proto_files(tmp_path):
    pytest.importorskip("grpc_tools")
    from fedrefine.runtime.protos.__main__ import generate

    protos = generate(tmp_path)
    assert {p.stem for p in protos} >= {"participant", "registry"}
    for proto in protos:
        for suffix in ("_pb2.py", "_pb2_grpc.py"):
            fresh = tmp_path / "fedrefine" / "runtime" / "protos" / f"{proto.stem}{suffix}"
            committed = PROTOS / f"{proto.stem}{suffix}"
            assert without_stamps(committed.read_text()) == without_stamps(fresh.read_text()), (
                f"{committed.name} is stale: run python -m fedrefine.runtime.protos"
            )


def test_version_stamps_are_masked_and_nothing_else():
    code = (PROTOS / "participant_pb2_grpc.py").read_text()
    restamped = STAMPS[0].sub(r"\g<1>9.99.99\g<3>", code)  # what the next grpcio-tools release writes
    assert restamped != code and without_stamps(restamped) == without_stamps(code)
    assert STAMP in without_stamps(code)
    renamed = code.replace("/fedrefine.participant.v1.Participant/Prefill", "/fedrefine.participant.v1.Participant/Fill")
    assert without_stamps(renamed) != without_stamps(code)  # what the protos say still counts

    message_code = (PROTOS / "participant_pb2.py").read_text()
    assert without_stamps(message_code).count(STAMP) == 2  # the header comment and the runtime check's numbers


def test_committed_stamps_are_admitted_by_the_declared_lower_bounds():
    """Code stamped newer than pyproject's lower bound would refuse to import on an install the bound allows."""
    bounds = lower_bounds()
    assert set(bounds) == {"grpc", "protobuf"}
    for module in committed_modules():
        for library, version in stamped_versions(module.read_text()).items():
            assert version <= bounds[library], (
                f"{module.name} was generated for {library} {'.'.join(map(str, version))}, newer than pyproject's "
                f"lower bound {'.'.join(map(str, bounds[library]))}: raise the bound or regenerate with older tools"
            )
