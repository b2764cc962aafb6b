"""ZeroMQ curve key files: generation with backups, and clear errors for bad files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from directord.errors import ConfigError
from directord.security import curve


def test_generate_writes_pairs_with_private_modes(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server", "client", "node1"])
    for name in ("server", "client", "node1"):
        public, secret = curve.load_keypair(str(tmp_path), name)
        assert len(public) == 40 and len(secret) == 40
        mode = os.stat(tmp_path / "private_keys" / f"{name}.key_secret").st_mode & 0o777
        assert mode == 0o600
    assert curve.known_clients(str(tmp_path)) == {
        curve.load_public(str(tmp_path), "client"): "client",
        curve.load_public(str(tmp_path), "node1"): "node1",
    }


def test_generating_again_backs_up_the_old_keys(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server"])
    old_secret = (tmp_path / "private_keys" / "server.key_secret").read_text()
    curve.generate(str(tmp_path), ["server"])
    assert (tmp_path / "private_keys" / "server.key_secret").read_text() != old_secret
    backups = list((tmp_path / "backups").glob("*/private_keys/server.key_secret"))
    assert [b.read_text() for b in backups] == [old_secret]


def test_missing_key_dir_names_it(tmp_path: Path) -> None:
    message = f"{tmp_path / 'nope'}: key directory does not exist"
    with pytest.raises(ConfigError, match=re.escape(message)):
        curve.load_keypair(str(tmp_path / "nope"), "server")


def test_public_key_without_secret_names_the_missing_file(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server"])
    (tmp_path / "private_keys" / "server.key_secret").unlink()
    with pytest.raises(ConfigError, match=re.escape("server.key_secret: key file does not exist")):
        curve.load_keypair(str(tmp_path), "server")


def test_malformed_and_mismatched_keys_name_the_file(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server", "other"])
    public = tmp_path / "public_keys" / "server.key"
    good = public.read_text()
    public.write_text('metadata\ncurve\n    public-key = "short"\n')
    message = f"{public}: public-key is not a 40-character Z85 key"
    with pytest.raises(ConfigError, match=re.escape(message)):
        curve.load_keypair(str(tmp_path), "server")
    public.write_text("garbage\n")
    with pytest.raises(ConfigError, match=re.escape(f"{public}: no public-key in key file")):
        curve.load_keypair(str(tmp_path), "server")
    # A secret that belongs to another public key.
    public.write_text(good)
    other_secret = (tmp_path / "private_keys" / "other.key_secret").read_text()
    (tmp_path / "private_keys" / "server.key_secret").write_text(other_secret)
    with pytest.raises(ConfigError, match="does not belong to public key"):
        curve.load_keypair(str(tmp_path), "server")
