"""``directord server --zmq-generate-keys [--client NAME ...]``."""

from __future__ import annotations

from pathlib import Path

from directord.errors import ConfigError
from directord.security import curve
from directord.transports.zmq import ZmqOptions


def generate_keys(options: ZmqOptions, clients: list[str]) -> int:
    """Write curve keys; existing files are backed up first. Prints what was written.

    Without ``--client``: the server key, the shared client key, and a fresh key
    for every node that already has one (a full rotation). With ``--client``:
    only those nodes (plus server and shared keys if they do not exist yet).

    Raises:
        ConfigError: a ``--client`` name is reserved or invalid (``--client server``
            would replace the server's key); nothing is written then.
    """
    for name in clients:
        curve.check_node_name(name)
    root = Path(options.zmq_key_dir)
    existing = sorted(p.stem for p in (root / "public_keys").glob("*.key"))
    if clients:
        names = [n for n in (curve.SERVER, curve.SHARED_CLIENT) if n not in existing] + clients
    else:
        nodes = [n for n in existing if n not in (curve.SERVER, curve.SHARED_CLIENT)]
        for name in nodes:
            # e.g. a ca.key made before names were checked: say which file stops the rotation
            try:
                curve.check_node_name(name)
            except ConfigError as exc:
                path = root / "public_keys" / f"{name}.key"
                raise ConfigError(
                    f"{path}: {exc}; move it out of the way to rotate the other keys",
                    key="zmq_key_dir",
                ) from None
        names = [curve.SERVER, curve.SHARED_CLIENT, *nodes]
    for path in curve.generate(options.zmq_key_dir, names):
        print(path)
    return 0
