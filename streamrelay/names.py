"""Stream names: ``[A-Za-z0-9][A-Za-z0-9._-]{0,63}``, optionally followed by a
rendition label, ``BASE~LABEL`` with LABEL ``[A-Za-z0-9][A-Za-z0-9_-]{0,15}``
(docs/protocol.md, "Renditions").  ``~`` cannot appear in a v1 name, so no existing name
collides with a rendition's."""

from __future__ import annotations

import re

_BASE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_LABEL = r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}"
_STREAM_NAME = re.compile(rf"{_BASE}(?:~{_LABEL})?")
_BASE_NAME = re.compile(_BASE)
_LABEL_NAME = re.compile(_LABEL)

RENDITION_SEPARATOR = "~"


def is_valid_stream_name(name: str) -> bool:
    """True when ``name`` is an acceptable stream name (a base or a rendition's)."""
    return _STREAM_NAME.fullmatch(name) is not None


def is_valid_label(label: str) -> bool:
    """True when ``label`` may name a rendition (``BASE~LABEL``)."""
    return _LABEL_NAME.fullmatch(label) is not None


def split_rendition(name: str) -> tuple[str, str | None]:
    """``(BASE, LABEL)`` of a rendition's name, ``(name, None)`` of a base name."""
    base, separator, label = name.partition(RENDITION_SEPARATOR)
    return (base, label) if separator else (name, None)


def base_name(name: str) -> str:
    """The base stream of ``name`` (``cam`` for ``cam~360p`` and for ``cam``)."""
    return name.partition(RENDITION_SEPARATOR)[0]


def rendition_name(base: str, label: str | None) -> str:
    """The stream name of rendition ``label`` of ``base`` (``base`` itself for None)."""
    return base if label is None else f"{base}{RENDITION_SEPARATOR}{label}"


def is_rendition_of(name: str, base: str) -> bool:
    """True when ``name`` is ``base`` itself or one of its renditions' valid names."""
    found_base, label = split_rendition(name)
    return (
        found_base == base
        and _BASE_NAME.fullmatch(base) is not None
        and (label is None or is_valid_label(label))
    )
