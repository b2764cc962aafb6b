"""``directord unit-file NAME``: print a systemd unit that runs this installation.

Directord shipped ``directord-server-systemd`` and ``directord-client-systemd``
to install its units. Here one command prints the unit, with ``ExecStart``
pointing at the ``directord`` of the running installation (a venv in
/opt/directord, say), so ``directord unit-file client >
/etc/systemd/system/directord-client.service`` installs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from importlib import resources

from directord.config import Settings

UNITS = {
    "client": "directord-client.service",
    "server": "directord-server.service",
    "server-socket": "directord-server.socket",
    "api-socket": "directord-api.socket",
    "proxy": "directord-proxy@.service",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Which unit."""
    p.add_argument("unit", choices=sorted(UNITS), help="the unit to print")


def executable() -> str:
    """The ``directord`` script beside the running interpreter, else ``python -m directord``."""
    script = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "directord")
    if os.access(script, os.X_OK):
        return script
    return f"{os.path.abspath(sys.executable)} -m directord"


def run_unit_file(ns: argparse.Namespace, settings: Settings) -> int:
    """Print the unit."""
    text = (resources.files("directord") / "systemd" / UNITS[ns.unit]).read_text("utf-8")
    here = executable()
    for key in ("ExecStart", "ExecStop"):
        text = text.replace(f"{key}=/usr/bin/directord", f"{key}={here}")
    print(text, end="")
    return 0
