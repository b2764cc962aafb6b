"""ZeroMQ curve key files: generation with backups, names a key may take, clear errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from directord.cli.keys import generate_keys
from directord.errors import ConfigError
from directord.security import curve
from directord.transports.zmq import ZmqOptions


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


@pytest.mark.parametrize("name", ["ca", "CA", "server", "client", "", "../x", ".hidden", "a b"])
def test_a_node_key_may_not_take_a_reserved_or_invalid_name(name: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(f"cannot make a key for {name!r}")):
        curve.check_node_name(name)
    curve.check_node_name("node1.example.com")


@pytest.mark.parametrize("name", ["ca", "../x", "a b"])
def test_generate_refuses_a_bad_name_before_writing_anything(tmp_path: Path, name: str) -> None:
    # server and client are directord's own keys: generate makes them, and nothing else
    # reserved; one bad name stops the whole run before the first file.
    with pytest.raises(ConfigError, match=re.escape(f"cannot make a key for {name!r}")):
        curve.generate(str(tmp_path), ["server", "client", "node1", name])
    assert list(tmp_path.iterdir()) == []


def test_full_rotation_names_a_reserved_key_file_and_writes_nothing(tmp_path: Path) -> None:
    curve.generate(str(tmp_path), ["server", "client", "node1"])
    # a node key named "ca", as an older version could make
    (tmp_path / "public_keys" / "ca.key").write_text(
        (tmp_path / "public_keys" / "node1.key").read_text()
    )
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    settings = ZmqOptions(zmq_key_dir=str(tmp_path))
    message = f"{tmp_path / 'public_keys' / 'ca.key'}: cannot make a key for 'ca'"
    with pytest.raises(ConfigError, match=re.escape(message)):
        generate_keys(settings, [])
    with pytest.raises(ConfigError, match=re.escape("cannot make a key for 'server'")):
        generate_keys(settings, ["node2", "server"])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before
