"""Node identities: which names a node may register under, on every driver.

Some names belong to directord itself: ``server`` and ``client`` name the
ZeroMQ key files (``server.key_secret`` is the server's own secret, ``client``
the shared client key) and ``ca`` names the CA's files in the PKI directory.
A node registered under one of them could be handed those files by a
per-node COPY (``{identity}`` in a file name), so no driver lets a node take
them.
"""

from __future__ import annotations

import re

#: Names no node may use: they name directord's own key and certificate files.
RESERVED = frozenset({"server", "client", "ca"})
#: What an identity may contain (a host name, an FQDN, ``user@host``, ``name:port``).
IDENTITY_RE = re.compile(r"^[A-Za-z0-9_.:@-]{1,253}$")


def identity_problem(identity: object) -> str | None:
    """Why ``identity`` may not be a node's name, or None when it may."""
    if not isinstance(identity, str) or not IDENTITY_RE.match(identity):
        return f"invalid identity {identity!r}"
    if identity.startswith((".", "-")):
        return f"invalid identity {identity!r} (must not start with '.' or '-')"
    if identity.lower() in RESERVED:
        return (
            f"identity {identity!r} is reserved (it names directord's own key files: "
            f"{', '.join(sorted(RESERVED))})"
        )
    return None
