"""Helpers for tests that start real FedRefine servers: processes on 127.0.0.1, free ports, bounded waits,
and a self-signed certificate made in the test."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

SERVER_START_TIMEOUT_S = 120.0


@contextmanager
def server_process(args: list[str], workdir: Path, name: str = "server", env: dict[str, str] | None = None):
    """Run ``python -m fedrefine.cli serve <args>`` on a free port; yield (process, port); always stop it."""
    ready = workdir / f"{name}.port"
    log = (workdir / f"{name}.log").open("w")
    command = [sys.executable, "-m", "fedrefine.cli", "serve", *args, "--port", "0", "--ready-file", str(ready)]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not ready.exists():
            if process.poll() is not None:
                raise RuntimeError(f"{name} exited with {process.returncode}:\n{(workdir / f'{name}.log').read_text()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} did not start in {SERVER_START_TIMEOUT_S} s")
            time.sleep(0.1)
        yield process, int(ready.read_text())
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        log.close()


def self_signed_certificate(directory: Path, name: str = "server") -> tuple[Path, Path]:
    """A self-signed certificate for ``localhost`` and 127.0.0.1 and its key, as PEM files in ``directory``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / f"{name}.crt", directory / f"{name}.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file
