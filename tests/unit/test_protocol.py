"""Envelope batches and length-prefixed frames (sans-IO)."""

from __future__ import annotations

import struct

import msgpack
import pytest

from directord.errors import ProtocolError, TransportError
from directord.protocol import MAX_FRAME, FrameDecoder, decode_batch, encode_batch, frame

BATCH = [
    {"t": "hello", "identity": "node0", "proto": 1, "known": ["a", "b"]},
    {
        "t": "result",
        "id": "j1",
        "state": "success",
        "rc": 0,
        "stdout": "ünï ✓\n",
        "exec_time": 0.25,
        "extra": None,
        "blob": b"\x00\xff",
    },
]


def test_encode_decode_round_trip() -> None:
    data = encode_batch(BATCH)
    assert isinstance(data, bytes)
    assert decode_batch(data) == BATCH


def test_empty_batch_round_trips() -> None:
    assert decode_batch(encode_batch([])) == []


def test_bytes_stay_bytes_and_text_stays_text() -> None:
    (env,) = decode_batch(encode_batch([{"t": "x", "b": b"raw", "s": "text"}]))
    assert env["b"] == b"raw" and isinstance(env["b"], bytes)
    assert env["s"] == "text" and isinstance(env["s"], str)


def test_encode_refuses_oversized_batch() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_batch([{"t": "out", "d": "x" * MAX_FRAME}])


def test_decode_refuses_oversized_message_before_unpacking() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        decode_batch(b"\x90" + b"\x00" * MAX_FRAME)


@pytest.mark.parametrize(
    "garbage",
    [
        b"",  # truncated: nothing at all
        b"\xc1",  # a byte msgpack never uses
        b"\x92\x81\xa1t\xa1a",  # array of 2 with only one element: truncated
        encode_batch(BATCH)[:-3],  # a real batch cut short
        b"\x91\x81\xa1t\xa1a\xff\xff",  # trailing bytes after a complete batch
    ],
)
def test_garbage_raises_protocol_error(garbage: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_batch(garbage)


@pytest.mark.parametrize(
    "value",
    [
        {"t": "hello"},  # one envelope, not a batch
        "hello",
        42,
        None,
    ],
)
def test_non_list_raises_protocol_error(value: object) -> None:
    with pytest.raises(ProtocolError, match="not a batch"):
        decode_batch(msgpack.packb(value))


@pytest.mark.parametrize(
    "batch",
    [
        [{"id": "j1"}],  # no type
        [{"t": 1}],  # type not a string
        [{"t": None}],
        [{"t": "ok"}, "not a map"],
        [{"t": "ok"}, ["t", "x"]],
    ],
)
def test_envelope_without_string_type_raises_protocol_error(batch: list[object]) -> None:
    with pytest.raises(ProtocolError, match="without a type"):
        decode_batch(msgpack.packb(batch))


def test_non_string_map_keys_are_refused() -> None:
    with pytest.raises(ProtocolError):
        decode_batch(msgpack.packb([{1: "x", "t": "a"}]))


def test_protocol_error_is_a_transport_error() -> None:
    assert issubclass(ProtocolError, TransportError)


# ---- frames ---------------------------------------------------------------------------------


def test_frame_has_big_endian_length_prefix() -> None:
    body = encode_batch(BATCH)
    framed = frame(BATCH)
    assert framed[:4] == struct.pack(">I", len(body))
    assert framed[4:] == body


def test_decoder_whole_frames_in_one_feed() -> None:
    decoder = FrameDecoder()
    second = [{"t": "ping", "n": 2}]
    assert decoder.feed(frame(BATCH) + frame(second)) == [BATCH, second]
    assert decoder.pending == 0


def test_decoder_frame_split_across_every_byte() -> None:
    decoder = FrameDecoder()
    data = frame(BATCH) + frame([{"t": "two"}])
    out = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
        if i < len(data) - 1:
            assert len(out) < 2
    assert out == [BATCH, [{"t": "two"}]]
    assert decoder.pending == 0


def test_decoder_keeps_partial_frame_pending() -> None:
    decoder = FrameDecoder()
    data = frame(BATCH)
    assert decoder.feed(data[:2]) == []  # not even the whole length prefix
    assert decoder.pending == 2
    assert decoder.feed(data[2:10]) == []
    assert decoder.pending == 10
    assert decoder.feed(data[10:] + data[:5]) == [BATCH]
    assert decoder.pending == 5
    assert decoder.feed(data[5:]) == [BATCH]
    assert decoder.pending == 0


def test_decoder_rejects_oversize_frame_from_its_header() -> None:
    decoder = FrameDecoder(max_frame=100)
    with pytest.raises(ProtocolError, match="exceeds the 100 byte limit"):
        decoder.feed(struct.pack(">I", 101))  # the header alone is enough to refuse


def test_decoder_default_limit_is_max_frame() -> None:
    decoder = FrameDecoder()
    assert decoder.feed(struct.pack(">I", MAX_FRAME)) == []  # allowed, waits for body
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", MAX_FRAME + 1))


def test_decoder_garbage_body_raises_protocol_error() -> None:
    decoder = FrameDecoder()
    with pytest.raises(ProtocolError):
        decoder.feed(struct.pack(">I", 3) + b"\xc1\xc1\xc1")


def test_decoder_frame_of_non_batch_raises_protocol_error() -> None:
    body = msgpack.packb({"t": "hello"})
    with pytest.raises(ProtocolError):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)
