"""Running a gRPC server in the foreground: bind, announce the port, serve until SIGINT/SIGTERM, stop in time."""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from fedrefine.runtime.security import ServerSecurity, logger

#: Seconds in-flight calls get to finish when the server stops.
STOP_GRACE_S = 5.0
#: Largest request a server accepts (a Prefill request carries token ids; a registry request, two identities).
MAX_REQUEST_BYTES = 16 * 2**20


def new_server(security: ServerSecurity, workers: int = 8, max_request_bytes: int = MAX_REQUEST_BYTES) -> grpc.Server:
    """A gRPC server with the token check installed and request/response size limits."""
    options = [("grpc.max_receive_message_length", max_request_bytes), ("grpc.so_reuseport", 0)]
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers), interceptors=security.interceptors(), options=options
    )


def add_health(server: grpc.Server, *services: str) -> health.HealthServicer:
    """gRPC's standard health service, every named service (and the server as a whole, "") SERVING."""
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ("", *services):
        servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def add_security_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("security")
    group.add_argument("--token-file", help="file holding the federation's bearer token (calls without it are refused)")
    group.add_argument("--token-env", help="environment variable holding the token")
    group.add_argument("--cert-file", help="PEM server certificate: serve over TLS (grpcs://)")
    group.add_argument("--key-file", help="PEM private key of --cert-file")
    group.add_argument("--client-ca-file", help="PEM CA of client certificates: require mutual TLS")


def add_address_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=0, help="port to bind (0: a free one, announced on stdout)")
    parser.add_argument("--ready-file", help="write the bound port to this file once serving (for scripts and tests)")


def security_from(args: argparse.Namespace) -> ServerSecurity:
    return ServerSecurity(args.token_file, args.token_env, args.cert_file, args.key_file, args.client_ca_file)


def serve_forever(server: grpc.Server, port: int, what: str, ready_file: str | None = None) -> None:
    """Start ``server``, announce it, and block until SIGINT or SIGTERM; then stop within :data:`STOP_GRACE_S`."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    server.start()
    print(f"{what} serving on port {port}", flush=True)
    if ready_file:
        partial = Path(f"{ready_file}.partial")
        partial.write_text(str(port))
        partial.replace(ready_file)  # appears whole: a reader never sees a half-written port
    while not stop.wait(0.5):
        pass
    logger.info("%s stopping", what)
    server.stop(STOP_GRACE_S).wait(STOP_GRACE_S + 1)
