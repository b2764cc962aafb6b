"""The server refuses to start on a bad curve key file, naming it, and changes nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from directord.security import curve


def test_unreadable_key_file_is_a_clean_cli_error(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server", "client"])
    secret = tmp_path / "private_keys" / "server.key_secret"
    secret.write_text("not a key\n")
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "directord",
            "--config-file",
            "/dev/null",
            "--driver",
            "zmq",
            "--zmq-key-dir",
            str(tmp_path),
            "--datastore",
            "memory",
            "--socket-path",
            str(tmp_path / "api.sock"),
            "--job-port",
            "0",
            "server",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.startswith("directord:")]
    assert lines == [f"directord: {secret}: no secret-key in key file"]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
