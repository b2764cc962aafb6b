"""Sans-IO wire protocol: envelopes, batching and stream framing; no sockets here."""

from directord.protocol.envelope import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    Envelope,
    FrameDecoder,
    decode_batch,
    encode_batch,
    frame,
    join_packed,
    message_digest,
    pack,
)

__all__ = [
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "Envelope",
    "FrameDecoder",
    "decode_batch",
    "encode_batch",
    "frame",
    "join_packed",
    "message_digest",
    "pack",
]
