"""Batches and frames: how typed messages (protocol.messages) travel.

One transport message is a *batch*: a msgpack array of messages, so a burst
of 1000 jobs or results costs one send, not 1000. Each message is encoded
once (a job sent to many nodes too) and batches are joined from the encoded
parts. On byte streams (the user API's Unix socket and TCP) each batch is
prefixed by its length as 4 big-endian bytes.

``encode_batch`` and ``decode_batch`` handle plain msgpack: the tests use them
to play a hostile peer; directord itself speaks typed messages only.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from typing import Any

import msgspec

from directord.errors import ProtocolError
from directord.protocol.messages import MAX_FRAME, BatchDecoder, encode

Envelope = dict[str, Any]
_LEN = struct.Struct(">I")


def join_packed(parts: Sequence[bytes]) -> bytes:
    """A batch made of messages encoded one by one: an array header and the parts."""
    n = len(parts)
    if n < 16:
        header = bytes([0x90 | n])
    elif n < 0x10000:
        header = b"\xdc" + n.to_bytes(2, "big")
    else:
        header = b"\xdd" + n.to_bytes(4, "big")
    return header + b"".join(parts)


def message_digest(data: bytes) -> str:
    """SHA-256 of one message, hex: how a node checks a job parked in a broker."""
    return hashlib.sha256(data).hexdigest()


def frame(messages: Sequence[msgspec.Struct]) -> bytes:
    """Encode messages as one batch with its length prefix, for byte streams.

    Raises:
        ProtocolError: the batch would exceed MAX_FRAME.
    """
    body = join_packed([encode(m) for m in messages])
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"batch of {len(body)} bytes exceeds the {MAX_FRAME} byte limit")
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder of length-prefixed batches on a byte stream."""

    def __init__(self, decoder: BatchDecoder | PlainBatches, max_frame: int = MAX_FRAME) -> None:
        self._decoder = decoder
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[list[Any]]:
        """Add bytes; return every complete batch now available, decoded.

        Raises:
            ProtocolError: a frame announces more than ``max_frame`` bytes, or is not
                a batch of the messages this side may receive.
        """
        self._buf += data
        out: list[list[Any]] = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds the {self._max} byte limit")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            out.append(self._decoder.decode(body))
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)


# ---- plain msgpack, for tests that play a hostile peer --------------------------------------
def pack(value: Any) -> bytes:
    """Any value as msgpack (a hostile peer's way: no types are checked)."""
    import msgpack  # only tests play hostile peers: the daemons never map it

    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


class PlainBatches:
    """Decodes batches into plain maps, for a FrameDecoder in a test that plays a user."""

    def decode(self, data: bytes) -> list[Envelope]:
        """A batch as plain maps (see :func:`decode_batch`)."""
        return decode_batch(data)


def encode_batch(envelopes: list[Any]) -> bytes:
    """Pack any values as one batch (a hostile peer's way: no types are checked)."""
    import msgpack

    data: bytes = msgpack.packb(envelopes, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"batch of {len(data)} bytes exceeds the {MAX_FRAME} byte limit")
    return data


def decode_batch(data: bytes) -> list[Envelope]:
    """Unpack one batch as plain maps (what a test peer reads)."""
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME} byte limit")
    import msgpack

    try:
        batch = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({type(exc).__name__})") from None
    if not isinstance(batch, list):
        raise ProtocolError("message is not a batch of envelopes")
    if not all(isinstance(env, dict) and isinstance(env.get("t"), str) for env in batch):
        raise ProtocolError("envelope without a type")
    return batch
