"""The ZeroMQ driver's ZAP handler, apart so that zmq.py imports without pyzmq.

zmq.py imports this module when its server first needs authentication.
"""

from __future__ import annotations

import logging
from typing import Any

import zmq
import zmq.utils.z85
from zmq.auth.asyncio import AsyncioAuthenticator

log = logging.getLogger("directord.transports.zmq")


class Authenticator(AsyncioAuthenticator):
    """ZAP handler whose CURVE user id is the key's name, not the key itself."""

    names: dict[bytes, str] = {}

    def _authenticate_plain(self, domain: str, username: str, password: str) -> Any:
        allowed, reason = super()._authenticate_plain(domain, username, password)
        if not allowed:
            log.warning("zmq: refused a client with a wrong or missing shared key")
        return allowed, reason

    def curve_user_id(self, client_public_key: bytes) -> str:
        z85 = zmq.utils.z85.encode(client_public_key)
        return self.names.get(z85, "?")
