"""Tokens and secret files made from the documented format (``docs/protocol.md``), not
with ``streamrelay.tokens``: a test that uses them checks the relay against the
contract."""

from __future__ import annotations

import hashlib
import hmac
from pathlib import Path


def make_token(secret: bytes, role: str, stream: str, expires: int) -> str:
    """``<expires>.<hex HMAC-SHA256(secret, "<role>:<stream>:<expires>")>``."""
    digest = hmac.new(secret, f"{role}:{stream}:{expires}".encode(), hashlib.sha256)
    return f"{expires}.{digest.hexdigest()}"


def write_secret(folder: Path, name: str, secret: bytes) -> Path:
    """A secret file for ``--publish-secret-file`` / ``--view-secret-file``."""
    path = folder / name
    path.write_bytes(secret + b"\n")
    return path
