"""Stream names: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``."""

from __future__ import annotations

import re

_STREAM_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def is_valid_stream_name(name: str) -> bool:
    """True when ``name`` is an acceptable stream name."""
    return _STREAM_NAME.fullmatch(name) is not None
