"""``fedrefine serve participant|registry``: one FedRefine service in the foreground."""

from __future__ import annotations

import sys

USAGE = """usage: fedrefine serve {participant,registry} [options]

  participant  one participant (a sender, or a receiver offering rephrasing) as a gRPC service:
               Prefill (its KV message in the wire format), Hint (T2T), Rephrase, Identity, health
  registry     the fuser registry: fusers by exact (sender, receiver) identity, with a sha256 per file

fedrefine serve <service> --help lists its options."""


def main(argv: list[str]) -> None:
    service = argv[0] if argv else None
    if service == "participant":
        from fedrefine.runtime.participant_server import main as participant_main

        return participant_main(argv[1:])
    if service == "registry":
        from fedrefine.runtime.registry_server import main as registry_main

        return registry_main(argv[1:])
    print(USAGE, file=sys.stderr if service not in ("-h", "--help") else sys.stdout)
    raise SystemExit(0 if service in ("-h", "--help") else 2)
