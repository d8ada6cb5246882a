"""Who may call a FedRefine service: TLS (server certificate, optionally mutual) and a per-federation bearer token.

The token travels as ``authorization: Bearer <token>`` call metadata. Servers refuse a call without the
right token with ``UNAUTHENTICATED`` and log it; gRPC's health service stays open (load balancers and
``grpc_health_probe`` call it without credentials). Tokens are read from a file or an environment
variable, never from a config file that might be committed.
"""

from __future__ import annotations

import hmac
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fedrefine.settings import documented

logger = logging.getLogger("fedrefine.runtime")
TOKEN_HEADER = "authorization"
#: Methods callable without the token.
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


class PortUnavailableError(ConnectionError):
    """A server's address cannot be bound (the port is taken, or the host is not this machine's)."""


class SecurityConfigError(ValueError):
    """TLS or token settings that cannot work (missing file, a key without its certificate, ...)."""


def read_token(token_file: str | None = None, token_env: str | None = None) -> str | None:
    """The bearer token from ``token_file`` (stripped) or the environment variable ``token_env``; None if neither."""
    if token_file:
        path = Path(token_file).expanduser()
        if not path.is_file():
            raise SecurityConfigError(f"Token file {path} does not exist; write the federation's token there.")
        token = path.read_text().strip()
        if not token:
            raise SecurityConfigError(f"Token file {path} is empty.")
        return token
    if token_env:
        token = os.environ.get(token_env, "").strip()
        if not token:
            raise SecurityConfigError(f"Environment variable {token_env} holds no token; export it or unset token_env.")
        return token
    return None


def _read(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    file = Path(path).expanduser()
    if not file.is_file():
        raise SecurityConfigError(f"{what} {file} does not exist.")
    return file.read_bytes()


@dataclass
class BearerToken:
    """Where the federation's bearer token is read from (a server checks it, a client sends it)."""

    token_file: str | None = field(default=None, metadata={"help": "File holding the federation's bearer token."})
    token_env: str | None = field(
        default=None, metadata={"help": "Environment variable holding the token (when no token_file)."}
    )

    def token(self) -> str | None:
        return read_token(self.token_file, self.token_env)


@documented
@dataclass
class ServerSecurity(BearerToken):
    """How a FedRefine server authenticates itself and its callers."""

    cert_file: str | None = field(default=None, metadata={"help": "PEM server certificate (chain): serve over TLS."})
    key_file: str | None = field(default=None, metadata={"help": "PEM private key of cert_file."})
    client_ca_file: str | None = field(
        default=None, metadata={"help": "PEM CA of client certificates: mutual TLS, clients without one are refused."}
    )

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityConfigError("Give both cert_file and key_file for TLS, or neither.")
        if self.client_ca_file is not None and self.cert_file is None:
            raise SecurityConfigError("Mutual TLS (client_ca_file) needs the server's own cert_file and key_file.")

    @property
    def tls(self) -> bool:
        return self.cert_file is not None

    def interceptors(self) -> list[grpc.ServerInterceptor]:
        token = self.token()
        return [] if token is None else [TokenInterceptor(token)]

    def add_port(self, server: grpc.Server, address: str) -> int:
        """Bind ``address`` (``host:port``; port 0 picks a free one) securely when TLS is set; the bound port."""
        try:
            if not self.tls:
                port = server.add_insecure_port(address)
            else:
                pair = (_read(self.key_file, "Key file"), _read(self.cert_file, "Certificate file"))
                client_ca = _read(self.client_ca_file, "Client CA file")
                credentials = grpc.ssl_server_credentials([pair], root_certificates=client_ca,
                                                          require_client_auth=client_ca is not None)
                port = server.add_secure_port(address, credentials)
        except RuntimeError:  # grpcio raises where older versions returned 0
            port = 0
        if port == 0:
            raise PortUnavailableError(f"Cannot bind {address}: the port is taken or the host is not local. Choose "
                                       f"another --port (0: a free one) or --host.")
        return port


@documented
@dataclass
class ClientSecurity(BearerToken):
    """How a client reaches a FedRefine server: its token and, for ``grpcs://`` endpoints, TLS material."""

    ca_file: str | None = field(
        default=None, metadata={"help": "PEM CA (or the self-signed certificate) that signed the server's; None: system roots."}
    )
    cert_file: str | None = field(default=None, metadata={"help": "PEM client certificate, for mutual TLS."})
    key_file: str | None = field(default=None, metadata={"help": "PEM private key of cert_file."})
    server_name: str | None = field(
        default=None, metadata={"help": "Name to check the server's certificate against, when not the endpoint's host."}
    )

    def __post_init__(self) -> None:
        if (self.cert_file is None) != (self.key_file is None):
            raise SecurityConfigError("Give both cert_file and key_file for mutual TLS, or neither.")

    def metadata(self) -> tuple[tuple[str, str], ...]:
        token = self.token()
        return () if token is None else ((TOKEN_HEADER, f"Bearer {token}"),)

    def channel(self, target: str, tls: bool, options: list[tuple[str, object]]) -> grpc.Channel:
        """A channel to ``target`` (``host:port``): TLS when ``tls`` (a ``grpcs://`` endpoint), plaintext otherwise."""
        if not tls:
            return grpc.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca_file, "CA file"),
            private_key=_read(self.key_file, "Key file"),
            certificate_chain=_read(self.cert_file, "Certificate file"),
        )
        if self.server_name:
            options = [*options, ("grpc.ssl_target_name_override", self.server_name)]
        return grpc.secure_channel(target, credentials, options=options)


def split_endpoint(endpoint: str) -> tuple[str, bool]:
    """``grpc://host:port`` -> (``host:port``, False); ``grpcs://host:port`` -> (``host:port``, True)."""
    for scheme, tls in (("grpc://", False), ("grpcs://", True)):
        if endpoint.startswith(scheme):
            target = endpoint[len(scheme) :].rstrip("/")
            if ":" not in target:
                raise ValueError(f"Endpoint {endpoint!r} has no port; write {scheme}host:port.")
            return target, tls
    raise ValueError(f"Endpoint {endpoint!r} must start with grpc:// or grpcs:// (TLS).")


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses every call (but health checks) whose ``authorization`` metadata is not ``Bearer <token>``."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return continuation(handler_call_details)
        given = dict(handler_call_details.invocation_metadata or ()).get(TOKEN_HEADER)
        if given is not None and hmac.compare_digest(given.encode(), self._expected):
            return continuation(handler_call_details)
        logger.warning("Refused %s: %s bearer token.", method, "no" if given is None else "a wrong")
        return _refusal(continuation(handler_call_details), "missing or wrong bearer token for this federation")


def _refusal(handler: grpc.RpcMethodHandler | None, detail: str) -> grpc.RpcMethodHandler:
    """A handler of the same streaming shape as ``handler`` that aborts with UNAUTHENTICATED."""

    def abort(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, detail)

    if handler is not None and handler.response_streaming:
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(abort)
        return grpc.unary_stream_rpc_method_handler(abort)
    if handler is not None and handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(abort)
    return grpc.unary_unary_rpc_method_handler(abort)
