"""Fetching timm's pretrained weights from the Hugging Face Hub: quietly, and quickly offline.

Without network, huggingface_hub retries each request with back-off for about a minute and
logs every retry (through :mod:`logging`, which redirecting ``sys.stderr`` does not catch).
:func:`hub_fetch` quiets its logger and, where the Hub's host cannot be reached within a
few seconds, turns on its offline mode for the call: only the local cache is used, and a
missing file fails at once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse

PROBE_SECONDS = 3.0
_PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@contextmanager
def hub_fetch() -> Iterator[bool]:
    """Within: huggingface_hub logs errors only, and is offline if its host is unreachable.

    Yields whether the Hub was found unreachable (then only its cache is used). Everything
    is restored on exit. Without huggingface_hub installed, does nothing.
    """
    try:
        from huggingface_hub import constants
    except ImportError:
        yield False
        return
    logger = logging.getLogger("huggingface_hub")
    level, offline = logger.level, constants.HF_HUB_OFFLINE
    unreachable = not offline and not _reachable(constants.ENDPOINT)
    logger.setLevel(logging.ERROR)
    if unreachable:
        constants.HF_HUB_OFFLINE = True
    try:
        yield unreachable
    finally:
        logger.setLevel(level)
        constants.HF_HUB_OFFLINE = offline


def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to the endpoint's host opens within :data:`PROBE_SECONDS`.

    Behind a proxy the direct connection proves nothing: assume reachable.
    """
    if any(os.environ.get(name) for name in _PROXY_VARIABLES):
        return True
    url = urlparse(endpoint)
    if not url.hostname:
        return True
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((url.hostname, port), timeout=PROBE_SECONDS).close()
    except OSError:
        return False
    return True
