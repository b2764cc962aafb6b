"""``directord server --zmq-generate-keys [--client NAME ...]``."""

from __future__ import annotations

from pathlib import Path

from directord.config import Settings
from directord.security import curve


def generate_keys(settings: Settings, clients: list[str]) -> int:
    """Write curve keys; existing files are backed up first. Prints what was written.

    Without ``--client``: the server key, the shared client key, and a fresh key
    for every node that already has one (a full rotation). With ``--client``:
    only those nodes (plus server and shared keys if they do not exist yet).
    """
    root = Path(settings.zmq_key_dir)
    existing = sorted(p.stem for p in (root / "public_keys").glob("*.key"))
    if clients:
        names = [n for n in (curve.SERVER, curve.SHARED_CLIENT) if n not in existing] + clients
    else:
        names = [curve.SERVER, curve.SHARED_CLIENT] + [
            n for n in existing if n not in (curve.SERVER, curve.SHARED_CLIENT)
        ]
    for path in curve.generate(settings.zmq_key_dir, names):
        print(path)
    return 0
