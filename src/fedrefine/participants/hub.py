"""Is the Hugging Face hub reachable? Lets hub loads fail fast offline, with a message naming the local option."""

from __future__ import annotations

import os
import socket
from urllib.parse import urlparse


def hub_offline(timeout: float = 3.0) -> bool:
    """True when ``HF_HUB_OFFLINE`` is set or the hub endpoint cannot be reached within ``timeout`` seconds."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() not in ("0", "", "false", "no"):
        return True
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=timeout):
            return False
    except OSError:
        return True
