"""Participant identities on the wire: the JSON every FedRefine service carries, read back strictly."""

from __future__ import annotations

import json
from dataclasses import fields

from fedrefine.participants import ParticipantIdentity


def identity_json(identity: ParticipantIdentity) -> str:
    """``identity`` as the JSON the registry protocol carries (sorted keys, so equal identities read the same)."""
    return json.dumps(identity.to_dict(), sort_keys=True)


def identity_from_json(text: str, what: str) -> ParticipantIdentity:
    """Parse a ``ParticipantIdentity`` sent as JSON; ``ValueError`` naming ``what`` and the problem otherwise."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{what} identity is not JSON ({err}): {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} identity must be a JSON object, got {type(data).__name__}")
    expected = {f.name: getattr(f.type, "__name__", f.type) for f in fields(ParticipantIdentity)}  # "str" / "int"
    missing, unknown = sorted(expected.keys() - data.keys()), sorted(data.keys() - expected.keys())
    if missing or unknown:
        problems = [f"missing fields {missing}"] * bool(missing) + [f"unknown fields {unknown}"] * bool(unknown)
        raise ValueError(f"{what} identity has {' and '.join(problems)}; a ParticipantIdentity has {sorted(expected)}")
    wrong = [name for name, kind in expected.items()
             if not (isinstance(data[name], str) if kind == "str" else type(data[name]) is int)]
    if wrong:
        raise ValueError(f"{what} identity has fields of the wrong type: "
                         + ", ".join(f"{name}={data[name]!r} (expected {expected[name]})" for name in wrong))
    return ParticipantIdentity.from_dict(data)


def identity_differences(held: ParticipantIdentity, asked: ParticipantIdentity) -> list[str]:
    """The fields in which two identities differ, each as ``field held X, asked Y``."""
    pairs = [(f.name, getattr(held, f.name), getattr(asked, f.name)) for f in fields(ParticipantIdentity)]
    return [f"{name} held {a!r}, asked {b!r}" for name, a, b in pairs if a != b]
