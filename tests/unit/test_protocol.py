"""Typed messages, batches and length-prefixed frames (sans-IO)."""

from __future__ import annotations

import re
import struct

import msgpack
import pytest

from directord.errors import ProtocolError, TransportError
from directord.models import State
from directord.protocol import (
    FROM_NODE,
    FROM_SERVER,
    FROM_USER,
    MAX_FRAME,
    PROTOCOL_VERSION,
    Ack,
    ApiRequest,
    FrameDecoder,
    Heartbeat,
    Hello,
    Job,
    Message,
    Output,
    ParkedTaken,
    QueryData,
    QueryReport,
    Refuse,
    Reply,
    Request,
    Result,
    ResultAck,
    Welcome,
    decode_batch,
    encode,
    encode_batch,
    frame,
    join_packed,
)

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
TYPED = [
    ApiRequest(rid=1, method="ping"),
    ApiRequest(rid=2, method="job_info", params={"id": "ünï ✓", "blob": b"\x00\xff"}),
]


def test_frame_has_big_endian_length_prefix() -> None:
    body = join_packed([encode(m) for m in TYPED])
    framed = frame(TYPED)
    assert framed[:4] == struct.pack(">I", len(body))
    assert framed[4:] == body


def test_decoder_whole_frames_in_one_feed() -> None:
    decoder = FrameDecoder(FROM_USER)
    second = [ApiRequest(rid=3, method="nodes")]
    assert decoder.feed(frame(TYPED) + frame(second)) == [TYPED, second]
    assert decoder.pending == 0


def test_decoder_frame_split_across_every_byte() -> None:
    decoder = FrameDecoder(FROM_USER)
    second = [ApiRequest(rid=3, method="nodes")]
    data = frame(TYPED) + frame(second)
    out = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i : i + 1]))
        if i < len(data) - 1:
            assert len(out) < 2
    assert out == [TYPED, second]
    assert decoder.pending == 0


def test_decoder_keeps_partial_frame_pending() -> None:
    decoder = FrameDecoder(FROM_USER)
    data = frame(TYPED)
    assert decoder.feed(data[:2]) == []  # not even the whole length prefix
    assert decoder.pending == 2
    assert decoder.feed(data[2:10]) == []
    assert decoder.pending == 10
    assert decoder.feed(data[10:] + data[:5]) == [TYPED]
    assert decoder.pending == 5
    assert decoder.feed(data[5:]) == [TYPED]
    assert decoder.pending == 0


def test_decoder_rejects_oversize_frame_from_its_header() -> None:
    decoder = FrameDecoder(FROM_USER, max_frame=100)
    with pytest.raises(ProtocolError, match="exceeds the 100 byte limit"):
        decoder.feed(struct.pack(">I", 101))  # the header alone is enough to refuse


def test_decoder_default_limit_is_max_frame() -> None:
    decoder = FrameDecoder(FROM_USER)
    assert decoder.feed(struct.pack(">I", MAX_FRAME)) == []  # allowed, waits for body
    with pytest.raises(ProtocolError):
        FrameDecoder(FROM_USER).feed(struct.pack(">I", MAX_FRAME + 1))


def test_decoder_garbage_body_raises_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        FrameDecoder(FROM_USER).feed(struct.pack(">I", 3) + b"\xc1\xc1\xc1")


def test_decoder_frame_of_non_batch_raises_protocol_error() -> None:
    body = msgpack.packb({"t": "req", "rid": 1, "m": "ping"})
    with pytest.raises(ProtocolError):
        FrameDecoder(FROM_USER).feed(struct.pack(">I", len(body)) + body)


# ---- typed messages -------------------------------------------------------------------------
EVERY_NODE_MESSAGE = [
    Hello(proto=PROTOCOL_VERSION, identity="web1", known=["j1"]),
    Heartbeat(),
    Ack(ids=["j1", "j2"]),
    Result(id="j1", state=State.SUCCESS, rc=0, stdout="ü\n", exec_time=0.25),
    Output(id="j1", stream="stdout", data="line"),
    Request(rid=7, method="chunk", params={"job": "j1", "index": 0, "offset": 0}),
    ParkedTaken(missing=["j3"]),
    QueryReport(id="j4", value={"nested": [1, "two", None]}),
]
EVERY_SERVER_MESSAGE = [
    Welcome(version="1.0", proto=PROTOCOL_VERSION, parked=[("j1", "a" * 64)]),
    Refuse(reason="no"),
    Job(id="j1", parent="p", lane="", verb="RUN", sha="s", options={"argv": "true"}, timeout=5),
    ResultAck(ids=["j1"]),
    Reply(rid=7, ok=True, result={"data": b"\x00", "eof": True}),
    Reply(rid=8, ok=False, error="no such job for this node"),
    QueryData(id="j4", data={"web1": {"k": "v"}}),
]


@pytest.mark.parametrize("message", EVERY_NODE_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_node_message_round_trips(message: Message) -> None:
    assert FROM_NODE.decode(join_packed([encode(message)])) == [message]


@pytest.mark.parametrize("message", EVERY_SERVER_MESSAGE, ids=lambda m: type(m).__name__)
def test_every_server_message_round_trips(message: Message) -> None:
    assert FROM_SERVER.decode(join_packed([encode(message)])) == [message]


def test_wire_names_stay_short_and_as_they_were() -> None:
    # The same maps as before the messages were typed: a node of the previous
    # release and a new server still understand each other.
    (out,) = decode_batch(join_packed([encode(Output(id="j", stream="stderr", data="x"))]))
    assert out == {"t": "out", "id": "j", "s": "stderr", "d": "x"}
    (req,) = decode_batch(join_packed([encode(Request(rid=1, method="m", params={}))]))
    assert req == {"t": "req", "rid": 1, "m": "m"}  # empty params are left out
    old_hello = {"t": "hello", "proto": 1, "identity": "n", "machine_id": "m", "known": []}
    assert FROM_NODE.decode(encode_batch([old_hello])) == [
        Hello(proto=1, identity="n", machine_id="m")
    ]


@pytest.mark.parametrize(
    ("batch", "where"),
    [
        ([{"t": "result", "id": "j", "state": "won"}], "$[0].state"),
        ([{"t": "result", "id": 5, "state": "success"}], "$[0].id"),
        ([{"t": "ack", "ids": "j1"}], "$[0].ids"),
        ([{"t": "hb"}, {"t": "req", "rid": "one", "m": "x"}], "$[1].rid"),
        ([{"t": "hello", "proto": 1, "identity": "x" * 2000}], "$[0].identity"),
        ([{"t": "hello", "proto": 1, "identity": "n", "heartbeat_interval": -1}], "$[0]"),
    ],
)
def test_a_bad_field_fails_at_decode_naming_its_path(batch: list[object], where: str) -> None:
    with pytest.raises(ProtocolError, match=re.escape(where)):
        FROM_NODE.decode(encode_batch(batch))


@pytest.mark.parametrize("kind", ["welcome", "job", "nope", "rep"])
def test_a_kind_a_node_may_not_send_is_refused(kind: str) -> None:
    with pytest.raises(ProtocolError, match="bad node message"):
        FROM_NODE.decode(encode_batch([{"t": kind}]))


def test_unknown_fields_are_ignored_within_a_major_version() -> None:
    assert FROM_NODE.decode(encode_batch([{"t": "hb", "later": 1}])) == [Heartbeat()]
