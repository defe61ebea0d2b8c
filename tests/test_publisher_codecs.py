"""VP9 and AV1 from the real encoders (libvpx-vp9, SVT-AV1 through PyAV) follow their v1
profiles: framing, KEY flags, CONFIG, codec strings; the messages decode back with PyAV."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

import av
import pytest

from streamrelay.publisher.arguments import parse_arguments
from streamrelay.publisher.av1 import (
    OBU_SEQUENCE_HEADER,
    OBU_TEMPORAL_DELIMITER,
    Av1Error,
    Av1Packager,
    frame_is_shown_key,
    parse_sequence_header,
    split_obus,
)
from streamrelay.publisher.codecs import Av1Encoder, Vp9Encoder, create_encoder
from streamrelay.publisher.encoder import EncoderSettings, H264Encoder
from streamrelay.publisher.testpattern import TestPattern
from streamrelay.publisher.vp9 import (
    Vp9Error,
    Vp9Packager,
    codec_string_from_record,
    parse_frame_header,
    split_superframe,
    vp9_level,
)
from streamrelay.wire import MediaMessage
from tests.test_publisher_encoder import encoder_settings

WIDTH, HEIGHT = 320, 240
DECODERS = {"vp9": "vp9", "av1": "libdav1d"}


def settings(**overrides: object) -> EncoderSettings:
    """:func:`encoder_settings` at 400 kbit/s unless overridden."""
    return encoder_settings(**{"bitrate": 400_000, **overrides})


def encode(
    encoder: Vp9Encoder | Av1Encoder, count: int, force_at: frozenset[int] = frozenset()
) -> list[list[MediaMessage]]:
    pattern = TestPattern(encoder.settings.width, encoder.settings.height)
    try:
        return [
            encoder.encode(
                pattern.render(index, 1_700_000_000 + index / 30),
                1_700_000_000_000_000 + index,
                force_keyframe=index in force_at,
            )
            for index in range(count)
        ]
    finally:
        encoder.close()


def decode(codec: str, payloads: list[bytes]) -> list[av.VideoFrame]:
    """Decode payloads (one message each) with PyAV; every payload must give a picture."""
    context: Any = av.CodecContext.create(DECODERS[codec], "r")
    frames: list[av.VideoFrame] = []
    for payload in payloads:
        frames.extend(context.decode(av.Packet(payload)))
    frames.extend(context.decode(None))
    return frames


@pytest.mark.parametrize(
    ("width", "height", "fps", "level"),
    [
        (320, 240, 30, 20),
        (640, 360, 30, 21),
        (1280, 720, 30, 31),
        (1280, 720, 60, 40),
        (1920, 1080, 30, 40),
        (1920, 1080, 60, 41),
        (3840, 2160, 30, 50),
        (7680, 4320, 30, 60),
    ],
)
def test_vp9_level_follows_the_level_table(width: int, height: int, fps: int, level: int) -> None:
    """The VP9 level is the lowest whose picture size and luma sample rate hold the stream."""
    assert vp9_level(width, height, Fraction(fps)) == level


def test_vp9_level_beyond_the_table_is_refused() -> None:
    """A size and rate past level 6.2 has no VP9 level."""
    with pytest.raises(Vp9Error):
        vp9_level(8192, 8192, Fraction(240))


def test_vp9_codec_string_from_the_configuration_record() -> None:
    """``vp09.PP.LL.DD`` reads profile, level and bit depth from the vpcC body."""
    assert codec_string_from_record(bytes([0, 31, 0x82, 1, 1, 1, 0, 0])) == "vp09.00.31.08"
    assert codec_string_from_record(bytes([2, 41, 0xA2, 9, 16, 9, 0, 0])) == "vp09.02.41.10"
    with pytest.raises(Vp9Error):
        codec_string_from_record(b"\x00\x1f")


def test_vp9_stream_is_config_then_key_and_one_frame_per_message() -> None:
    """libvpx-vp9 output: CONFIG (vpcC) then KEY first, one message per frame after,
    KEY exactly at the GOP boundaries and the forced frame; meta names ``vp09.00.20.08``
    and everything decodes back to 320x240 pictures, one per message."""
    encoder = Vp9Encoder(settings())
    batches = encode(encoder, 25, frozenset({4}))
    first = batches[0]
    assert [(m.is_config, m.is_key) for m in first] == [(True, False), (False, True)]
    record = first[0].payload
    assert record == bytes([0, 20, 0x82]) + record[3:6] + b"\x00\x00"
    assert all(len(batch) == 1 for batch in batches[1:])
    keys = [index for index, batch in enumerate(batches) if batch[-1].is_key]
    assert keys == [0, 4, 10, 20]
    meta = encoder.meta(extra=1)
    assert meta is not None
    assert meta["codec"] == "vp09.00.20.08" == codec_string_from_record(record)
    assert (meta["width"], meta["height"], meta["extra"]) == (WIDTH, HEIGHT, 1)
    for batch in batches:
        info = parse_frame_header(batch[-1].payload)
        assert info.key == batch[-1].is_key and info.show_frame
    payloads = [batch[-1].payload for batch in batches]
    pictures = decode("vp9", payloads)
    assert len(pictures) == len(payloads)
    assert {(p.width, p.height) for p in pictures} == {(WIDTH, HEIGHT)}
    # A decoder that joins at a mid-stream KEY decodes from there on.
    assert len(decode("vp9", payloads[10:])) == 15


def test_vp9_request_keyframe_makes_the_next_frame_a_key() -> None:
    """``request_keyframe`` (any thread) makes the next encoded frame a KEY, once."""
    encoder = Vp9Encoder(settings(keyframe_interval_frames=100))
    pattern = TestPattern(WIDTH, HEIGHT)
    flags = []
    for index in range(6):
        if index == 3:
            encoder.request_keyframe()
        flags.append(encoder.encode(pattern.render(index, index / 30), index)[-1].is_key)
    encoder.close()
    assert flags == [True, False, False, True, False, False]


def test_vp9_superframe_is_split_by_its_index() -> None:
    """A superframe's trailing index gives its frames; a plain frame is returned whole."""
    frames = [b"\x82" + b"a" * 300, b"\x86" + b"b" * 5]
    marker = 0xC0 | (1 << 3) | 1  # two frames, two bytes per size
    index = bytes([marker]) + b"".join(len(f).to_bytes(2, "little") for f in frames)
    superframe = b"".join(frames) + index + bytes([marker])
    assert split_superframe(superframe) == frames
    assert split_superframe(frames[0]) == [frames[0]]


def test_vp9_packager_refuses_a_key_flag_on_an_inter_frame() -> None:
    """The encoder's KEY flag is checked against the frame header."""
    batches = encode(Vp9Encoder(settings()), 2)
    packager = Vp9Packager(WIDTH, HEIGHT, 30)
    packager.package(batches[0][-1].payload, True, 0)
    with pytest.raises(Vp9Error):
        packager.package(batches[1][0].payload, True, 1)
    with pytest.raises(Vp9Error):
        Vp9Packager(WIDTH, HEIGHT, 30).package(batches[1][0].payload, False, 1)


def test_av1_stream_is_config_then_keys_that_carry_the_sequence_header() -> None:
    """SVT-AV1 output: CONFIG = the sequence header OBU, then a KEY; every payload is a
    low-overhead temporal unit; every KEY is a shown KEY_FRAME carrying the same sequence
    header; meta names ``av01.P.LLT.DD`` from it; everything decodes back with dav1d,
    also from a mid-stream KEY."""
    encoder = Av1Encoder(settings())
    batches = encode(encoder, 25, frozenset({4}))
    first = batches[0]
    assert [(m.is_config, m.is_key) for m in first] == [(True, False), (False, True)]
    config = first[0].payload
    (header,) = split_obus(config)
    assert header.type == OBU_SEQUENCE_HEADER and header.data == config
    info = parse_sequence_header(header.payload)
    assert (info.profile, info.bit_depth, info.max_width, info.max_height) == (0, 8, 320, 240)
    meta = encoder.meta()
    assert meta is not None and meta["codec"] == info.codec_string
    assert meta["codec"] == f"av01.0.{info.level:02d}M.08"
    assert all(len(batch) == 1 for batch in batches[1:])
    keys = [index for index, batch in enumerate(batches) if batch[-1].is_key]
    assert keys[:2] == [0, 4] and len(keys) >= 3
    for batch in batches:
        message = batch[-1]
        obus = split_obus(message.payload)
        assert frame_is_shown_key(obus) == message.is_key
        if message.is_key:
            assert [o.data for o in obus if o.type == OBU_SEQUENCE_HEADER] == [config]
    payloads = [batch[-1].payload for batch in batches]
    pictures = decode("av1", payloads)
    assert len(pictures) == len(payloads)
    assert {(p.width, p.height) for p in pictures} == {(WIDTH, HEIGHT)}
    assert len(decode("av1", payloads[keys[1] :])) == len(payloads) - keys[1]


def test_av1_codec_string_reads_level_and_tier_of_operating_point_0() -> None:
    """Larger pictures need a higher seq_level_idx: SVT-AV1 signals it, and the codec
    string follows (two digits, tier letter)."""
    small = encode(Av1Encoder(settings(width=320, height=240)), 1)[0][0].payload
    large = encode(Av1Encoder(settings(width=1280, height=720)), 1)[0][0].payload
    small_info = parse_sequence_header(split_obus(small)[0].payload)
    large_info = parse_sequence_header(split_obus(large)[0].payload)
    assert large_info.level > small_info.level
    assert (large_info.max_width, large_info.max_height) == (1280, 720)
    assert large_info.codec_string == f"av01.0.{large_info.level:02d}M.08"


def test_av1_packager_inserts_the_known_sequence_header_into_a_bare_key() -> None:
    """A KEY temporal unit without a sequence header gets the last one inserted right
    after the temporal delimiter; no new CONFIG when it did not change."""
    batches = encode(Av1Encoder(settings()), 11)
    packager = Av1Packager()
    packager.package(batches[0][-1].payload, True, 0)
    key = batches[10][-1]
    assert key.is_key
    obus = split_obus(key.payload)
    bare = b"".join(o.data for o in obus if o.type != OBU_SEQUENCE_HEADER)
    messages = packager.package(bare, True, 10)
    assert [m.is_key for m in messages] == [True]
    assert [o.type for o in split_obus(messages[0].payload)][:2] == [
        OBU_TEMPORAL_DELIMITER,
        OBU_SEQUENCE_HEADER,
    ]
    assert messages[0].payload == key.payload


def test_av1_packager_refuses_broken_input() -> None:
    """Inter data before any sequence header, a KEY flag on an inter frame and OBUs
    without size fields are refused."""
    batches = encode(Av1Encoder(settings()), 2)
    delta = batches[1][0].payload
    with pytest.raises(Av1Error):
        Av1Packager().package(delta, False, 0)
    packager = Av1Packager()
    packager.package(batches[0][-1].payload, True, 0)
    with pytest.raises(Av1Error):
        packager.package(delta, True, 1)
    with pytest.raises(Av1Error):
        split_obus(b"\x30\x00")  # a frame OBU without obu_has_size_field


def test_create_encoder_and_the_codec_option() -> None:
    """``--codec`` picks the encoder (h264 by default); an unknown codec is refused."""
    assert isinstance(create_encoder("h264", settings()), H264Encoder)
    with pytest.raises(ValueError, match="codec must be one of"):
        create_encoder("theora", settings())
    assert parse_arguments([]).codec == "h264"
    assert parse_arguments(["--codec", "av1"]).codec == "av1"
    with pytest.raises(SystemExit):
        parse_arguments(["--codec", "theora"])
