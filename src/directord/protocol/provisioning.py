"""Provisioning messages: a node in provisioning mode and the provisioner, over TLS.

The node connects and announces itself; the provisioner then asks it things,
one request at a time, and the node answers::

    node -> provisioner   Announce (again every few seconds until provisioned), Answer
    provisioner -> node   Ask (inventory, gencsr, configure, restart), Refused

Frames are the same length-prefixed msgpack batches as the node protocol's,
limited to MAX_PROVISIONING_FRAME: an inventory larger than that is refused
at decode, before anything reads it.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

from directord.protocol.messages import BatchDecoder, Id, Message, Name

MAX_PROVISIONING_FRAME = 1024 * 1024
Token = Annotated[str, msgspec.Meta(max_length=1024)]
Text = Annotated[str, msgspec.Meta(max_length=64 * 1024)]
METHODS = ("inventory", "gencsr", "configure", "restart")


class Announce(Message, tag="announce"):
    """A node waiting to be provisioned: who it says it is, and the shared token."""

    identity: Name
    machine_id: Name
    token: Token
    version: Name = ""
    #: host facts and the operator's --provisioning-facts (the whole frame is bounded)
    facts: dict[str, Any] = {}


class Answer(Message, tag="answer"):
    """A node's answer to an Ask: ``result`` when ``ok``, else ``error``."""

    rid: int
    ok: bool
    result: Any = None
    error: Text = ""


class Ask(Message, tag="ask"):
    """The provisioner asks the node for something (one of METHODS)."""

    rid: int
    method: Id
    params: dict[str, Any] = {}


class Refused(Message, tag="refused"):
    """The provisioner will not provision this node (a wrong token, a rejection)."""

    reason: Text


FROM_PROVISIONING_NODE = BatchDecoder(Announce | Answer, "provisioning node")
FROM_PROVISIONER = BatchDecoder(Ask | Refused, "provisioner")
