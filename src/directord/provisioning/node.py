"""A node in provisioning mode: announce, answer the provisioner, restart as a client.

The node verifies the provisioner with the CA certificate it was shipped
(``--provisioning-ca``) and proves it may be provisioned with the shared
token. It answers ``inventory`` (identity, machine id, host facts and the
``--provisioning-facts`` file), ``gencsr`` (a key made here, 0600 in
``--pki-dir``, and a CSR for its identity), ``configure`` (the certificate,
CA and configuration, each written atomically; ``provision`` is turned off)
and ``restart`` (it re-executes itself as a normal client).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from directord import __version__
from directord.components.facts import (
    addresses_from_kernel,
    machine_id,
    mem_total,
    os_release,
    read_bounded,
)
from directord.config import Settings, option_fields
from directord.errors import ConfigError, ProtocolError
from directord.protocol import FrameDecoder, frame
from directord.protocol.provisioning import (
    FROM_PROVISIONER,
    MAX_PROVISIONING_FRAME,
    Announce,
    Answer,
    Ask,
    Refused,
)
from directord.security.pki import PKI

log = logging.getLogger(__name__)
ANNOUNCE_EVERY = 5.0  # seconds between announcements while nothing is asked
MAX_BACKOFF = 30.0
FACTS_FILE_LIMIT = 256 * 1024
# What the node keeps of its provisioning settings in the config it writes, so that
# it can re-enter provisioning when its certificate nears expiry.
KEPT = ("provisioning_address", "provisioning_token", "provisioning_ca", "provisioning_facts",
        "reprovision_before")  # fmt: skip


class Restart(Exception):
    """The provisioner said restart: the configuration is written."""


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{address!r} is not HOST:PORT", key="provisioning_address")
    return host.strip("[]"), int(port)


def read_facts_file(path: str) -> dict[str, Any]:
    """The operator's extra facts (JSON or YAML mapping)."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(FACTS_FILE_LIMIT + 1)
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot read: {exc.strerror}", key="provisioning_facts"
        ) from None
    if len(data) > FACTS_FILE_LIMIT:
        raise ConfigError(f"{path}: over {FACTS_FILE_LIMIT} bytes", key="provisioning_facts")
    try:
        facts = yaml.safe_load(data)  # JSON is YAML
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not JSON or YAML: {exc}", key="provisioning_facts") from None
    if not isinstance(facts, dict):
        raise ConfigError(f"{path}: facts must be a mapping", key="provisioning_facts")
    return facts


def host_facts() -> dict[str, Any]:
    """What the node tells about itself (the FACTS verb's facts, without facter)."""
    uname = os.uname()
    return {
        "os": os_release(read_bounded("/etc/os-release") or read_bounded("/usr/lib/os-release")),
        "kernel": {"name": uname.sysname, "release": uname.release, "machine": uname.machine},
        "cpus": os.cpu_count(),
        "memory": {"total": mem_total(read_bounded("/proc/meminfo"))},
        "addresses": addresses_from_kernel(),
        "hostname": socket.gethostname(),
    }


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write a file whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class ProvisioningNode:
    """Announces itself until a provisioner has configured it and said restart."""

    def __init__(self, settings: Settings) -> None:
        if not settings.provisioning_address or not settings.provisioning_ca:
            raise ConfigError(
                "provisioning mode needs --provisioning-address and --provisioning-ca",
                key="provisioning_address",
            )
        if not settings.provisioning_token:
            raise ConfigError("provisioning mode needs --provisioning-token",
                              key="provisioning_token")  # fmt: skip
        self.settings = settings
        self.identity = settings.resolved_identity()
        self.host, self.port = split_address(settings.provisioning_address)
        self.pki = PKI(settings.pki_dir)
        self.extra_facts = (
            read_facts_file(settings.provisioning_facts) if settings.provisioning_facts else {}
        )
        self.machine_id = settings.machine_id or machine_id() or ""
        self.tls = ssl.create_default_context(cafile=settings.provisioning_ca)

    async def run(self) -> None:
        """Announce and answer until told to restart (raises :class:`Restart`)."""
        backoff = 0.5
        while True:
            try:
                await self._session()
                backoff = 0.5
            except Restart:
                raise
            except (OSError, ssl.SSLError, ProtocolError, TimeoutError, EOFError) as exc:
                log.warning(
                    "provisioner %s:%d: %s", self.host, self.port, exc or type(exc).__name__
                )
            delay = backoff * (0.5 + random.random())
            await asyncio.sleep(delay)
            backoff = min(backoff * 2, MAX_BACKOFF)

    async def _session(self) -> None:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, ssl=self.tls, limit=2**20), 30
        )
        decoder = FrameDecoder(FROM_PROVISIONER, MAX_PROVISIONING_FRAME)
        announce = Announce(
            identity=self.identity,
            machine_id=self.machine_id,
            token=self.settings.provisioning_token,
            version=__version__,
            facts={**host_facts(), **self.extra_facts},
        )
        try:
            writer.write(frame([announce]))
            await writer.drain()
            log.info("announced %s to %s:%d", self.identity, self.host, self.port)
            while True:
                try:
                    data = await asyncio.wait_for(reader.read(65536), ANNOUNCE_EVERY)
                except TimeoutError:
                    writer.write(frame([announce]))  # still here, still waiting
                    await writer.drain()
                    continue
                if not data:
                    raise EOFError("the provisioner closed the connection")
                for batch in decoder.feed(data):
                    for message in batch:
                        if isinstance(message, Refused):
                            log.error("refused by the provisioner: %s", message.reason)
                            raise EOFError(f"refused: {message.reason}")
                        answer = await self._answer(message)
                        writer.write(frame([answer]))
                        await writer.drain()
                        if message.method == "restart" and answer.ok:
                            raise Restart()
        finally:
            writer.close()

    async def _answer(self, ask: Ask) -> Answer:
        try:
            result = await asyncio.to_thread(self._handle, ask.method, ask.params)
        except (ConfigError, OSError, ValueError, TypeError, KeyError) as exc:
            log.warning("provisioner's %s failed: %s", ask.method, exc)
            return Answer(rid=ask.rid, ok=False, error=f"{ask.method}: {exc}"[:4096])
        return Answer(rid=ask.rid, ok=True, result=result)

    def _handle(self, method: str, params: dict[str, Any]) -> Any:
        if method == "inventory":
            return {
                "identity": self.identity,
                "machine_id": self.machine_id,
                "facts": {**host_facts(), **self.extra_facts},
                "pki_dir": str(self.pki.dir),
            }
        if method == "gencsr":
            return {"csr": self.pki.csr(self.identity).read_text()}
        if method == "configure":
            self._configure(params)
            return {"configured": str(self.settings.config_file)}
        if method == "restart":
            return {"restarting": True}
        raise ValueError(f"unknown request {method!r}")

    def _configure(self, params: dict[str, Any]) -> None:
        certificate, ca = params.get("certificate"), params.get("ca")
        configuration = params.get("configuration")
        if not isinstance(certificate, str) or not isinstance(ca, str):
            raise ValueError("configure needs certificate and ca (PEM text)")
        if not isinstance(configuration, dict):
            raise ValueError("configure needs configuration (a mapping)")
        if "BEGIN CERTIFICATE" not in certificate or "BEGIN CERTIFICATE" not in ca:
            raise ValueError("certificate and ca must be PEM certificates")
        # Refused here, the node stays in provisioning and the provisioner logs why;
        # written, the client would refuse it at restart and the node would be lost.
        known = {f.name for f in option_fields()}
        unknown = sorted(str(k) for k in configuration if k not in known or k == "config_file")
        if unknown:
            raise ValueError(f"configuration has unknown keys: {', '.join(unknown)[:500]}")
        write_atomic(self.pki.cert_path(self.identity), certificate.encode(), 0o644)
        write_atomic(self.pki.ca_cert_path, ca.encode(), 0o644)
        config = dict(configuration)
        config.update(
            {
                "identity": self.identity,
                "provision": False,
                "pki_dir": str(self.pki.dir),
                **{k: getattr(self.settings, k) for k in KEPT},
            }
        )
        if self.settings.machine_id:  # announced again when it re-enters provisioning
            config["machine_id"] = self.settings.machine_id
        text = yaml.safe_dump(config, default_flow_style=False, sort_keys=True)
        # 0600: it holds the provisioning token, to re-enter provisioning later.
        write_atomic(Path(self.settings.config_file), text.encode(), 0o600)
        log.info("configured: %s", self.settings.config_file)


def restart_as_client(config_file: str) -> None:
    """Become a normal client with the configuration just written (never returns)."""
    argv = [sys.executable, "-m", "directord", "--config-file", config_file, "client"]
    log.info("restarting into the cluster: %s", " ".join(argv))
    logging.shutdown()
    os.execv(sys.executable, argv)


__all__ = ["ProvisioningNode", "Restart", "restart_as_client"]
