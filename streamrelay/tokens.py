"""Publisher, viewer and relay tokens: ``<expires-unix-seconds>.<hex HMAC-SHA256>``.

The HMAC covers ``"<role>:<stream>:<expires>"`` with the configured secret, where role
is the :class:`~streamrelay.roles.Role` value (``publish``, ``view`` or ``relay``).  A token is
checked once, when the connection is made: a connection outlives its token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

from streamrelay.roles import Role

# The roles a token can grant.
ROLES = (Role.PUBLISHER, Role.VIEWER, Role.RELAY)
_DIGEST_HEX_LENGTH = 64


class TokenError(Exception):
    """A token that does not grant the request; the message never contains the token."""


def token_role(role: Role | str) -> Role:
    """The :class:`Role` a token for ``role`` (a member or its value) grants; a
    ValueError for any role no token grants."""
    try:
        granted = Role(role)
    except ValueError:
        granted = None
    if granted is None or granted not in ROLES:
        raise ValueError(f"role must be one of {', '.join(r.value for r in ROLES)}")
    return granted


def _signature(secret: bytes, role: Role, stream: str, expires: int) -> str:
    message = f"{role.value}:{stream}:{expires}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def make_token(secret: bytes, role: Role | str, stream: str, expires: int) -> str:
    """Return a token granting ``role`` on ``stream`` until the Unix time ``expires``."""
    return f"{expires}.{_signature(secret, token_role(role), stream, expires)}"


def verify_token(secret: bytes, token: str, role: Role | str, stream: str, now: float) -> None:
    """Raise :class:`TokenError` unless ``token`` grants ``role`` on ``stream`` at ``now``."""
    granted = token_role(role)
    expires_text, dot, signature = token.partition(".")
    if not dot or not (expires_text.isascii() and expires_text.isdigit()):
        raise TokenError("malformed token")
    if len(expires_text) > 12:
        raise TokenError("malformed token")
    if len(signature) != _DIGEST_HEX_LENGTH:
        raise TokenError("malformed token")
    expires = int(expires_text)
    expected = _signature(secret, granted, stream, expires)
    # Compare before looking at the expiry so that timing says nothing about validity.
    if not hmac.compare_digest(expected.encode(), signature.lower().encode("ascii", "replace")):
        raise TokenError("invalid token")
    if expires <= now:
        raise TokenError("expired token")


def read_secret_file(path: str) -> bytes:
    """Read a secret from a file, stripping surrounding whitespace; refuse an empty one."""
    secret = Path(path).read_bytes().strip()
    if not secret:
        raise ValueError(f"secret file {path} is empty")
    return secret


def secret_from_environment(name: str) -> bytes | None:
    """Return the secret held in environment variable ``name``, or None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value.encode() if value else None
