"""Rendition sets: several encodings of one source, each published as a stream of its own.

``--renditions 1280x720@2500k,640x360@800k,320x180@250k`` (or ``360p=640x360@800k`` to
name one) is parsed by :func:`parse_renditions` into :class:`Rendition` records, highest
bitrate first. The top rendition is published at the base stream name itself (so that a
v1 viewer of ``cam`` gets full quality), each lower one at ``BASE~LABEL``
(:func:`rendition_stream_name`, the one place that knows the convention, and
:func:`rendition_url`). Every rendition's ``meta`` announces the whole set
(:func:`announcement`, :func:`rendition_meta`); see "Renditions" in docs/protocol.md.

No I/O and no PyAV here.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote, unquote, urlsplit, urlunsplit

LABEL_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,15}")
SEPARATOR: Final = "~"
MAX_RENDITIONS: Final = 8

_ITEM = re.compile(r"(?:(?P<label>[^=]*)=)?(?P<size>[^@]*)@(?P<bitrate>.*)")


class RenditionError(ValueError):
    """A rendition list that cannot be used, with the reason in words."""


@dataclass(frozen=True, slots=True)
class Rendition:
    """One encoding of the source: its label, picture size and target bitrate (bit/s)."""

    label: str
    width: int
    height: int
    bitrate: int

    def describe(self) -> str:
        """``360p=640x360@800k``: the form :func:`parse_renditions` reads back."""
        return f"{self.label}={self.width}x{self.height}@{self.bitrate // 1000}k"


def default_label(height: int) -> str:
    """The label a rendition gets when none is given: its height, e.g. ``360p``."""
    return f"{height}p"


def parse_renditions(text: str) -> tuple[Rendition, ...]:
    """Parse ``[LABEL=]WxH@BITRATE,...`` into renditions, highest bitrate first.

    Sizes and bitrates follow ``--size`` and ``--bitrate``; labels default to the height
    (``720p``) and must be unique and match ``[A-Za-z0-9][A-Za-z0-9_-]{0,15}``. Raises
    :class:`RenditionError` naming the item at fault.
    """
    # The option parsers of the command line: one set of rules for sizes and bitrates.
    from .arguments import parse_bitrate, parse_size

    items = [item.strip() for item in text.split(",")]
    if not text.strip() or not all(items):
        raise RenditionError(
            f"expected a comma-separated list such as 1280x720@2500k,640x360@800k, got {text!r}"
        )
    if len(items) > MAX_RENDITIONS:
        raise RenditionError(f"at most {MAX_RENDITIONS} renditions, got {len(items)}")
    renditions: list[Rendition] = []
    for item in items:
        match = _ITEM.fullmatch(item)
        if match is None:
            raise RenditionError(
                f"{item!r}: expected [LABEL=]WIDTHxHEIGHT@BITRATE, e.g. 640x360@800k"
            )
        try:
            width, height = parse_size(match.group("size"))
            bitrate = parse_bitrate(match.group("bitrate"))
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise RenditionError(f"{item!r}: {error}") from None
        label = match.group("label")
        if label is None:
            label = default_label(height)
        elif not LABEL_PATTERN.fullmatch(label.strip()):
            raise RenditionError(
                f"{item!r}: a label is 1-16 letters, digits, '_' or '-', starting with a "
                f"letter or digit, got {label!r}"
            )
        renditions.append(Rendition(label.strip(), width, height, bitrate))
    labels = [rendition.label for rendition in renditions]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise RenditionError(
            f"rendition label {duplicates[0]!r} is used twice; name them, e.g. "
            f"{duplicates[0]}a=...,{duplicates[0]}b=..."
        )
    # Highest bitrate first (the top one is the base stream); a stable sort keeps the
    # given order among equal bitrates, larger pictures first.
    return tuple(sorted(renditions, key=lambda r: (-r.bitrate, -r.width * r.height)))


def rendition_stream_name(base: str, label: str | None) -> str:
    """The relay stream of a rendition: ``base`` itself for the top one (``label`` None),
    ``BASE~LABEL`` for the others. The one place that knows the naming convention."""
    return base if label is None else f"{base}{SEPARATOR}{label}"


def base_stream_name(url: str) -> str:
    """The stream name of a ``.../publish/NAME`` URL (its last path segment)."""
    path = urlsplit(url).path
    name = unquote(path.rstrip("/").rpartition("/")[2])
    if not name:
        raise RenditionError(f"the relay URL names no stream: {url!r}")
    if SEPARATOR in name:
        raise RenditionError(
            f"the base stream name must not contain {SEPARATOR!r} (it separates the "
            f"rendition label): {name!r}"
        )
    return name


def rendition_url(url: str, stream: str) -> str:
    """``url`` with its last path segment (the stream name) replaced by ``stream``; the
    query (a token, say) is kept."""
    parts = urlsplit(url)
    head = parts.path.rstrip("/").rpartition("/")[0]
    return urlunsplit(
        (parts.scheme, parts.netloc, f"{head}/{quote(stream, safe='~')}", parts.query, "")
    )


@dataclass(frozen=True, slots=True)
class RenditionSet:
    """A parsed rendition list bound to a base stream name."""

    base: str
    renditions: tuple[Rendition, ...]

    def __post_init__(self) -> None:
        if not self.renditions:
            raise RenditionError("a rendition set needs at least one rendition")

    @property
    def top(self) -> Rendition:
        """The highest-bitrate rendition, published at the base name."""
        return self.renditions[0]

    def stream_name(self, rendition: Rendition) -> str:
        """The relay stream of one rendition."""
        label = None if rendition == self.top else rendition.label
        return rendition_stream_name(self.base, label)

    def streams(self) -> list[str]:
        """The relay streams, in the set's order."""
        return [self.stream_name(rendition) for rendition in self.renditions]


def announcement(
    renditions: RenditionSet, codecs: Mapping[str, str | None]
) -> list[dict[str, Any]]:
    """The ``renditions`` member of every rendition's ``meta``: the whole set, highest
    bitrate first (``codecs`` maps labels to codec strings; unknown ones are left out)."""
    entries: list[dict[str, Any]] = []
    for rendition in renditions.renditions:
        entry: dict[str, Any] = {
            "name": rendition.label,
            "stream": renditions.stream_name(rendition),
            "width": rendition.width,
            "height": rendition.height,
            "bitrate": rendition.bitrate,
        }
        codec = codecs.get(rendition.label)
        if codec is not None:
            entry["codec"] = codec
        entries.append(entry)
    return entries


def rendition_meta(
    base_meta: Mapping[str, Any],
    rendition: Rendition,
    renditions: RenditionSet,
    codecs: Mapping[str, str | None],
) -> dict[str, Any]:
    """One rendition's ``meta``: its own (``codec``, size, ``fps``) plus ``bitrate``,
    ``rendition`` (its label) and ``renditions`` (the set)."""
    return {
        **base_meta,
        "bitrate": rendition.bitrate,
        "rendition": rendition.label,
        "renditions": announcement(renditions, codecs),
    }


def describe_renditions(renditions: Sequence[Rendition]) -> str:
    """``720p=1280x720@2500k,360p=640x360@800k``, for logs."""
    return ",".join(rendition.describe() for rendition in renditions)


__all__ = [
    "LABEL_PATTERN",
    "MAX_RENDITIONS",
    "SEPARATOR",
    "Rendition",
    "RenditionError",
    "RenditionSet",
    "announcement",
    "base_stream_name",
    "default_label",
    "describe_renditions",
    "parse_renditions",
    "rendition_meta",
    "rendition_stream_name",
    "rendition_url",
]
