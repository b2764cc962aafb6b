"""Envelopes and frames.

An *envelope* is a msgpack map with a ``t`` (type) key. Envelopes travel in
*batches*: one transport message is a msgpack array of envelopes, so a burst
of 1000 jobs or results costs one send, not 1000. On byte streams (the user
API's Unix socket) each batch is prefixed by its length as 4 big-endian bytes.

Node <-> server envelope types::

    node -> server: hello, hb, ack(ids), result, out, req(rid, m, p), qrep
    server -> node: welcome, refuse(reason), job, rack(ids), rep(rid, ok, r|err), qdata

Anything that is not a well-formed batch of maps with a string ``t`` raises
:class:`ProtocolError`; callers close that peer and carry on.
"""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack

from directord.errors import ProtocolError

PROTOCOL_VERSION = 1
MAX_FRAME = 16 * 1024 * 1024
Envelope = dict[str, Any]
_LEN = struct.Struct(">I")


def encode_batch(envelopes: list[Envelope]) -> bytes:
    """Pack envelopes into one transport message."""
    data: bytes = msgpack.packb(envelopes, use_bin_type=True)
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"batch of {len(data)} bytes exceeds the {MAX_FRAME} byte limit")
    return data


def pack(envelope: Envelope) -> bytes:
    """Encode one envelope, to be joined into a batch by :func:`join_packed`."""
    data: bytes = msgpack.packb(envelope, use_bin_type=True)
    return data


def join_packed(parts: list[bytes]) -> bytes:
    """A batch made of envelopes packed one by one: an array header and the parts."""
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


def decode_batch(data: bytes) -> list[Envelope]:
    """Unpack one transport message; reject anything that is not a list of envelopes."""
    if len(data) > MAX_FRAME:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_FRAME} byte limit")
    try:
        batch = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for garbage
        raise ProtocolError(f"undecodable message ({type(exc).__name__})") from None
    if not isinstance(batch, list):
        raise ProtocolError("message is not a batch of envelopes")
    for env in batch:
        if not isinstance(env, dict) or not isinstance(env.get("t"), str):
            raise ProtocolError("envelope without a type")
    return batch


def frame(envelopes: list[Envelope]) -> bytes:
    """Encode a batch with its length prefix, for byte streams."""
    body = encode_batch(envelopes)
    return _LEN.pack(len(body)) + body


class FrameDecoder:
    """Incremental decoder for length-prefixed batches on a byte stream."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    def feed(self, data: bytes) -> list[list[Envelope]]:
        """Add bytes; return every complete batch now available.

        Raises:
            ProtocolError: a frame announces more than ``max_frame`` bytes, or is garbage.
        """
        self._buf += data
        out: list[list[Envelope]] = []
        while len(self._buf) >= 4:
            (size,) = _LEN.unpack_from(self._buf)
            if size > self._max:
                raise ProtocolError(f"frame of {size} bytes exceeds the {self._max} byte limit")
            if len(self._buf) < 4 + size:
                break
            body = bytes(self._buf[4 : 4 + size])
            del self._buf[: 4 + size]
            out.append(decode_batch(body))
        return out

    @property
    def pending(self) -> int:
        """Bytes buffered that do not yet form a whole frame."""
        return len(self._buf)
