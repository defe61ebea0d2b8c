"""Annex-B splitting, SPS parsing, codec strings and the v1 H.264 packaging rules."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from streamrelay.publisher.h264 import (
    NAL_AUD,
    NAL_IDR,
    NAL_PPS,
    NAL_SLICE,
    NAL_SPS,
    H264Error,
    H264Packager,
    avcc_config_to_parameter_sets,
    avcc_to_annexb,
    codec_string_from_sps,
    extract_parameter_sets,
    join_annexb,
    nal_type,
    parse_sps,
    split_annexb,
    unescape_rbsp,
)
from streamrelay.wire import FLAG_CONFIG, FLAG_KEY, WireError, parse_media

# libx264 output: constrained baseline, level 3.1, 1280x720 (with an emulation-prevention
# byte), and its PPS.
SPS_BASELINE_720P = bytes.fromhex("6742c01fda014016e840000003004000000f23c60ca8")
PPS_BASELINE = bytes.fromhex("68ce3c80")
SEI = bytes.fromhex("0605ff")
IDR_SLICE = bytes.fromhex("65888400ff")
P_SLICE = bytes.fromhex("419a2016bd")
AUD = bytes.fromhex("09f0")
P_SLICE_AU = join_annexb([P_SLICE])


def test_split_handles_three_and_four_byte_start_codes() -> None:
    """NAL units are found after 3- and 4-byte start codes, without trailing zero bytes."""
    stream = (
        b"\x00\x00\x00\x01"
        + SPS_BASELINE_720P
        + b"\x00\x00\x01"
        + PPS_BASELINE
        + b"\x00\x00"  # trailing_zero_8bits
        + b"\x00\x00\x00\x01"
        + IDR_SLICE
    )
    assert split_annexb(stream) == [SPS_BASELINE_720P, PPS_BASELINE, IDR_SLICE]
    assert [nal_type(unit) for unit in split_annexb(stream)] == [NAL_SPS, NAL_PPS, NAL_IDR]
    assert split_annexb(b"") == []


def test_split_refuses_data_that_is_not_annexb() -> None:
    """Bytes with no start code, or junk before the first one, are not Annex-B."""
    with pytest.raises(H264Error):
        split_annexb(b"\x67\x42\x00\x1f")
    with pytest.raises(H264Error):
        split_annexb(b"\x12\x00\x00\x01\x65\x88")


# NAL bodies that are valid after emulation prevention: no zero bytes at all is a simple
# subset, and the first byte (the NAL header) is never zero.
_nal_units = st.lists(st.binary(min_size=1, max_size=40).filter(lambda b: 0 not in b), max_size=8)


@given(_nal_units)
def test_join_then_split_round_trips(units: list[bytes]) -> None:
    """split_annexb(join_annexb(units)) gives the units back."""
    assert split_annexb(join_annexb(units)) == units


@given(_nal_units, st.sampled_from([1, 2, 4]))
def test_avcc_to_annexb(units: list[bytes], length_size: int) -> None:
    """Length-prefixed (AVCC) access units convert to the same NAL units in Annex-B."""
    units = [unit[:200] for unit in units]
    avcc = b"".join(len(unit).to_bytes(length_size, "big") + unit for unit in units)
    assert split_annexb(avcc_to_annexb(avcc, length_size)) == units


def test_avcc_errors_and_decoder_configuration_record() -> None:
    """Truncated AVCC data is refused; an avcC record yields its SPS, PPS and length size."""
    with pytest.raises(H264Error):
        avcc_to_annexb(b"\x00\x00\x00\x09\x65")
    record = (
        bytes([1, 0x42, 0xC0, 0x1F, 0xFF, 0xE1])
        + len(SPS_BASELINE_720P).to_bytes(2, "big")
        + SPS_BASELINE_720P
        + b"\x01"
        + len(PPS_BASELINE).to_bytes(2, "big")
        + PPS_BASELINE
    )
    assert avcc_config_to_parameter_sets(record) == ([SPS_BASELINE_720P], [PPS_BASELINE], 4)
    with pytest.raises(H264Error):
        avcc_config_to_parameter_sets(record[:-2])


def test_emulation_prevention_bytes_are_removed() -> None:
    """00 00 03 becomes 00 00; other bytes stay."""
    assert unescape_rbsp(b"\x00\x00\x03\x01\x00\x00\x03\x00\x03") == b"\x00\x00\x01\x00\x00\x00\x03"
    assert unescape_rbsp(b"\x01\x02") == b"\x01\x02"


def test_codec_string_and_sps_fields() -> None:
    """The codec string is avc1.PPCCLL from profile, constraints and level; size is decoded."""
    assert codec_string_from_sps(SPS_BASELINE_720P) == "avc1.42C01F"
    info = parse_sps(SPS_BASELINE_720P)
    assert (info.profile_idc, info.constraint_flags, info.level_idc) == (66, 0xC0, 31)
    assert (info.width, info.height) == (1280, 720)
    assert info.codec_string == "avc1.42C01F"
    with pytest.raises(H264Error):
        codec_string_from_sps(PPS_BASELINE)
    with pytest.raises(H264Error):
        parse_sps(SPS_BASELINE_720P[:6])


def test_extract_parameter_sets() -> None:
    """SPS and PPS are picked out of an access unit in order."""
    units = [AUD, SPS_BASELINE_720P, PPS_BASELINE, SEI, IDR_SLICE]
    assert extract_parameter_sets(units) == ([SPS_BASELINE_720P], [PPS_BASELINE])
    assert extract_parameter_sets([P_SLICE]) == ([], [])


def test_packager_sends_config_before_first_key_and_on_change_only() -> None:
    """CONFIG (SPS+PPS) precedes the first KEY, is not repeated while unchanged, and comes
    again before a KEY whose parameter sets changed; deltas pass through unflagged."""
    packager = H264Packager()
    key_au = join_annexb([SPS_BASELINE_720P, PPS_BASELINE, SEI, IDR_SLICE])
    first = packager.package(key_au, 100)
    assert [m.flags for m in first] == [FLAG_CONFIG, FLAG_KEY]
    assert first[0].payload == join_annexb([SPS_BASELINE_720P, PPS_BASELINE])
    assert first[1].payload == key_au
    assert all(m.capture_time_us == 100 for m in first)
    assert packager.codec_string == "avc1.42C01F"

    delta = packager.package(join_annexb([P_SLICE]), 133)
    assert [(m.flags, m.capture_time_us) for m in delta] == [(0, 133)]
    assert [m.flags for m in packager.package(key_au, 166)] == [FLAG_KEY]

    new_pps = bytes.fromhex("68ce3c81")
    changed = packager.package(join_annexb([SPS_BASELINE_720P, new_pps, IDR_SLICE]), 200)
    assert [m.flags for m in changed] == [FLAG_CONFIG, FLAG_KEY]
    assert split_annexb(changed[0].payload) == [SPS_BASELINE_720P, new_pps]


def test_packaged_messages_are_checked_wire_messages() -> None:
    """What the packager yields is what goes on the wire: each message's bytes parse back
    to the same message with the capture time in the header; a capture time outside 64
    unsigned bits is refused before any message exists."""
    key_au = join_annexb([SPS_BASELINE_720P, PPS_BASELINE, IDR_SLICE])
    packager = H264Packager()
    latest = 2**64 - 1
    for message in [*packager.package(key_au, latest), *packager.package(P_SLICE_AU, 0)]:
        assert parse_media(message.data) == message
        assert message.data[1:9] == message.capture_time_us.to_bytes(8, "big")
    for bad in (-1, 2**64):
        with pytest.raises(WireError):
            H264Packager().package(key_au, bad)
        with pytest.raises(WireError):
            packager.package(P_SLICE_AU, bad)


def test_packager_puts_parameter_sets_into_keys_that_lack_them() -> None:
    """An encoder with global headers: parameter sets arrive alone (yielding a CONFIG), and
    each IDR without them gets them inserted after its access unit delimiter."""
    packager = H264Packager()
    config_only = packager.package(join_annexb([SPS_BASELINE_720P, PPS_BASELINE]), 1)
    assert [m.flags for m in config_only] == [FLAG_CONFIG]
    (key,) = packager.package(join_annexb([AUD, IDR_SLICE]), 2)
    assert key.flags == FLAG_KEY
    assert [nal_type(u) for u in split_annexb(key.payload)] == [NAL_AUD, NAL_SPS, NAL_PPS, NAL_IDR]


def test_packager_refuses_an_idr_with_no_known_parameter_sets() -> None:
    """A KEY that cannot carry SPS/PPS would not be decodable: it is an error."""
    with pytest.raises(H264Error):
        H264Packager().package(join_annexb([IDR_SLICE]), 1)
    assert nal_type(P_SLICE) == NAL_SLICE
