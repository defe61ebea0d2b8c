"""Real libx264 output from H264Encoder follows the v1 H.264 profile."""

from __future__ import annotations

from fractions import Fraction

import av
import av.video.frame
import pytest

from streamrelay.publisher.encoder import EncoderSettings, H264Encoder
from streamrelay.publisher.h264 import (
    NAL_IDR,
    NAL_PPS,
    NAL_SEI,
    NAL_SPS,
    join_annexb,
    nal_type,
    parse_sps,
    split_annexb,
)
from streamrelay.publisher.testpattern import TestPattern
from streamrelay.wire import MediaMessage

WIDTH, HEIGHT = 320, 240


def encoder_settings(**overrides: object) -> EncoderSettings:
    """320x240 at 30 fps, 500 kbit/s, a KEY every 10 frames; ``overrides`` applied."""
    values: dict[str, object] = {
        "width": WIDTH,
        "height": HEIGHT,
        "fps": Fraction(30),
        "bitrate": 500_000,
        "keyframe_interval_frames": 10,
    }
    values.update(overrides)
    return EncoderSettings(**values)  # type: ignore[arg-type]


def make_encoder(**overrides: object) -> H264Encoder:
    """A libx264 encoder with :func:`encoder_settings`, ultrafast unless overridden."""
    return H264Encoder(encoder_settings(**{"preset": "ultrafast", **overrides}))


def encode_frames(
    encoder: H264Encoder, count: int, *, start: int = 0, force_at: frozenset[int] = frozenset()
) -> list[list[MediaMessage]]:
    pattern = TestPattern(encoder.settings.width, encoder.settings.height)
    return [
        encoder.encode(
            pattern.render(index, 1_700_000_000 + index / 30),
            1_700_000_000_000_000 + index,
            force_keyframe=index in force_at,
        )
        for index in range(start, start + count)
    ]


def nal_types(payload: bytes) -> list[int]:
    return [nal_type(unit) for unit in split_annexb(payload)]


def test_first_output_is_config_then_a_self_contained_key() -> None:
    """The first frame yields CONFIG = SPS+PPS, then a KEY that starts with the same SPS and
    PPS and holds an IDR (SEI allowed in between); timestamps are the capture times."""
    encoder = make_encoder()
    (first, *_rest) = encode_frames(encoder, 3)
    config, key = first
    assert config.is_config and key.is_key
    assert nal_types(config.payload) == [NAL_SPS, NAL_PPS]
    key_units = split_annexb(key.payload)
    assert [nal_type(u) for u in key_units[:2]] == [NAL_SPS, NAL_PPS]
    assert join_annexb(key_units[:2]) == config.payload
    rest = [nal_type(u) for u in key_units[2:]]
    assert NAL_IDR in rest and set(rest) <= {NAL_SEI, NAL_IDR}
    assert config.capture_time_us == key.capture_time_us == 1_700_000_000_000_000


def test_gop_every_key_carries_sps_pps_and_deltas_do_not() -> None:
    """With a 10-frame GOP, frames 0, 10, 20 are KEYs with in-band SPS/PPS; the others are
    single delta messages with no parameter sets and no IDR; CONFIG is sent only once."""
    encoder = make_encoder(keyframe_interval_frames=10)
    outputs = encode_frames(encoder, 25)
    configs = [i for i, out in enumerate(outputs) for m in out if m.is_config]
    keys = [i for i, out in enumerate(outputs) for m in out if m.is_key]
    assert configs == [0]
    assert keys == [0, 10, 20]
    for index, output in enumerate(outputs):
        frame = output[-1]
        types = nal_types(frame.payload)
        if index in keys:
            assert types[:2] == [NAL_SPS, NAL_PPS] and NAL_IDR in types
        else:
            assert len(output) == 1 and frame.flags == 0
            assert not {NAL_SPS, NAL_PPS, NAL_IDR} & set(types)


def test_keyframe_request_makes_the_next_frame_an_idr() -> None:
    """request_keyframe() (any thread) or force_keyframe turns the very next frame into a
    KEY, mid-GOP, carrying its own SPS and PPS."""
    encoder = make_encoder(keyframe_interval_frames=1000)
    encode_frames(encoder, 4)
    encoder.request_keyframe()
    (requested,) = encode_frames(encoder, 1, start=4)
    assert requested[-1].is_key
    assert nal_types(requested[-1].payload)[:2] == [NAL_SPS, NAL_PPS]
    (after,) = encode_frames(encoder, 1, start=5)
    assert not after[-1].is_key
    (forced,) = encode_frames(encoder, 1, start=6, force_at=frozenset({6}))
    assert forced[-1].is_key


def test_an_incoming_picture_type_does_not_force_keyframes() -> None:
    """A decoded frame keeps its source's I type; the encoder must not obey it, or a file
    source would make every source I-frame an IDR."""
    encoder = make_encoder(keyframe_interval_frames=1000)
    encode_frames(encoder, 2)
    frame = TestPattern(WIDTH, HEIGHT).render(2, 1_700_000_001.0)
    frame.pict_type = av.video.frame.PictureType.I
    assert not encoder.encode(frame, 1)[-1].is_key


def test_decoding_can_start_at_any_key() -> None:
    """A fresh decoder fed a mid-stream KEY (no CONFIG, no earlier frames) and the deltas
    after it outputs pictures of the encoded size."""
    encoder = make_encoder(keyframe_interval_frames=10)
    outputs = encode_frames(encoder, 15)
    decoder = av.CodecContext.create("h264", "r")
    pictures = []
    for output in outputs[10:]:
        for message in output:
            if not message.is_config:
                for packet in decoder.parse(message.payload):
                    pictures.extend(decoder.decode(packet))
    pictures.extend(decoder.decode(None))
    assert len(pictures) >= 4
    assert (pictures[0].width, pictures[0].height) == (WIDTH, HEIGHT)


@pytest.mark.parametrize(
    ("profile", "size", "codec_prefix"),
    [
        ("baseline", (1920, 1080), "avc1.42C0"),
        ("main", (640, 360), "avc1.4D"),
        ("high", (854, 480), "avc1.64"),
    ],
)
def test_codec_string_and_meta_follow_profile_and_size(
    profile: str, size: tuple[int, int], codec_prefix: str
) -> None:
    """meta's codec string comes from the SPS libx264 writes for the profile, and the SPS
    decodes to the configured size (1080p exercises frame cropping). The profile is an upper
    bound for libx264, so use a preset whose tools need it (ultrafast stays baseline)."""
    width, height = size
    encoder = make_encoder(profile=profile, width=width, height=height, preset="veryfast")
    assert encoder.meta() is None
    encode_frames(encoder, 1)
    codec = encoder.codec_string
    assert codec is not None and codec.startswith(codec_prefix) and len(codec) == 11
    info = encoder.sps_info
    assert info is not None and (info.width, info.height) == size
    assert encoder.meta() == {
        "type": "meta",
        "codec": codec,
        "width": width,
        "height": height,
        "fps": 30,
    }
    assert encoder.config_payload is not None
    assert parse_sps(split_annexb(encoder.config_payload)[0]) == info


def test_meta_gives_a_fractional_frame_rate_to_three_decimals() -> None:
    """NTSC rates go into meta rounded (30000/1001 -> 29.97), whole rates as integers."""
    encoder = make_encoder(fps=Fraction(30000, 1001))
    encode_frames(encoder, 1)
    meta = encoder.meta(source="testsrc")
    assert meta is not None and meta["fps"] == 29.97 and meta["source"] == "testsrc"


def test_frames_of_another_size_are_scaled() -> None:
    """A picture of another size or pixel format is converted before encoding."""
    encoder = make_encoder()
    big = TestPattern(640, 480).render(0, 1_700_000_000.0).reformat(format="rgb24")
    messages = encoder.encode(big, 1)
    assert messages[-1].is_key
    assert encoder.sps_info is not None and encoder.sps_info.width == WIDTH


def test_settings_are_validated() -> None:
    """Odd sizes, unknown presets/profiles and empty GOPs are refused up front."""
    for bad in (
        {"width": 321},
        {"preset": "placebo"},
        {"profile": "high10"},
        {"keyframe_interval_frames": 0},
        {"fps": Fraction(0)},
    ):
        with pytest.raises(ValueError):
            EncoderSettings(**bad)  # type: ignore[arg-type]
