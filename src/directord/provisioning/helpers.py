"""Provisioning helpers: the program that decides what a node gets.

The contract (any program): JSON on stdin ``{identity, csr, inventory}``;
JSON on stdout ``{defer, msg, certificate, ca, configuration, reject}``.
``defer`` leaves the node for the next cycle; ``reject`` lists it as rejected
until an operator clears it. A helper that exits non-zero, outlives its
timeout or prints something else than that JSON defers the node, and the
error is logged with the node's name.

``builtin`` signs the CSR with the PKI in ``--pki-dir`` and renders the
``--node-config`` template (Jinja2 over ``identity`` and ``facts``), filling
in the TLS paths of the node's own PKI directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from directord.errors import ConfigError, DirectordError
from directord.security.pki import PKI, SigningRequest

MAX_HELPER_OUTPUT = 1024 * 1024


class HelperError(DirectordError):
    """The helper failed (exit status, timeout, bad output): the node is deferred."""


@dataclass(slots=True)
class Decision:
    """What a helper decided for one node."""

    defer: bool = False
    reject: bool = False
    msg: str = ""
    certificate: str = ""
    ca: str = ""
    configuration: dict[str, Any] = field(default_factory=dict)


def decision_from(data: object) -> Decision:
    """Check a helper's answer.

    Raises:
        HelperError: not the contract's JSON object, or fields of the wrong type.
    """
    if not isinstance(data, dict):
        raise HelperError("the helper's answer is not a JSON object")
    decision = Decision(
        defer=data.get("defer") is True,
        reject=data.get("reject") is True,
        msg=str(data.get("msg") or "")[:4096],
        certificate=data.get("certificate") or "",
        ca=data.get("ca") or "",
        configuration=data.get("configuration") or {},
    )
    if decision.defer or decision.reject:
        return decision
    if not isinstance(decision.certificate, str) or "BEGIN CERTIFICATE" not in decision.certificate:
        raise HelperError("the helper's answer has no PEM certificate")
    if not isinstance(decision.ca, str) or "BEGIN CERTIFICATE" not in decision.ca:
        raise HelperError("the helper's answer has no PEM ca")
    if not isinstance(decision.configuration, dict):
        raise HelperError("the helper's configuration is not a mapping")
    return decision


async def run_program(path: str, request: dict[str, Any], timeout: float) -> Decision:
    """Run an external helper on one node's request.

    Raises:
        HelperError: it could not start, exited non-zero, timed out, or answered badly.
    """
    try:
        proc = await asyncio.create_subprocess_exec(
            path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
    except OSError as exc:
        raise HelperError(f"cannot run {path}: {exc.strerror or exc}") from None
    try:
        out, err = await asyncio.wait_for(_exchange(proc, json.dumps(request).encode()), timeout)
    except TimeoutError:
        await _reap(proc)
        raise HelperError(f"{path} did not answer within {timeout:g}s; killed") from None
    except HelperError as exc:
        await _reap(proc)
        raise HelperError(f"{path} {exc}") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace").strip().splitlines()[-1:] or ["(no stderr)"]
        raise HelperError(f"{path} exited {proc.returncode}: {tail[0][:500]}")
    try:
        data = json.loads(out)
    except ValueError:
        raise HelperError(f"{path} did not print JSON") from None
    return decision_from(data)


async def _exchange(proc: asyncio.subprocess.Process, data: bytes) -> tuple[bytes, bytes]:
    """Write the request, read stdout (bounded) and the end of stderr, wait for the exit."""
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        proc.stdin.write(data)
        await proc.stdin.drain()
        proc.stdin.close()
    stdout, stderr = proc.stdout, proc.stderr

    async def out() -> bytes:
        kept = bytearray()
        while chunk := await stdout.read(65536):
            kept += chunk
            if len(kept) > MAX_HELPER_OUTPUT:  # a runaway helper must not fill our memory
                raise HelperError(f"printed over {MAX_HELPER_OUTPUT} bytes; killed")
        return bytes(kept)

    async def err() -> bytes:
        kept = bytearray()
        while chunk := await stderr.read(65536):
            kept = (kept + chunk)[-8192:]
        return bytes(kept)

    readers = [asyncio.create_task(out()), asyncio.create_task(err())]
    try:
        result = await asyncio.gather(*readers)
    except BaseException:
        for task in readers:  # neither may be left reading a pipe _reap must drain
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        raise
    await proc.wait()
    return result[0], result[1]


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Kill the helper's process group, drain its pipes, and wait for it.

    Undrained, a full pipe would stop the transport reading, its end would never
    be seen, and wait() would never return.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            while await stream.read(65536):
                pass
    await proc.wait()


class BuiltinHelper:
    """Signs with the local CA and renders the node configuration template."""

    def __init__(self, pki_dir: str, node_config: str, days: int) -> None:
        self.pki = PKI(pki_dir)
        if not self.pki.ca_cert_path.exists():
            raise ConfigError(
                f"{pki_dir}: no CA here for the builtin helper; run `directord pki init`",
                key="pki_dir",
            )
        self.ca = self.pki.ca_cert_path.read_text()
        self.days = days
        self.template = None
        if node_config:
            try:
                text = Path(node_config).read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(f"{node_config}: cannot read: {exc.strerror}",
                                  key="node_config") from None  # fmt: skip
            env = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
            try:
                self.template = env.from_string(text)
            except TemplateError as exc:
                raise ConfigError(f"{node_config}: {exc}", key="node_config") from None

    def decide(self, request: SigningRequest, inventory: dict[str, Any]) -> Decision:
        identity = request.name
        configuration: dict[str, Any] = {}
        if self.template is not None:
            try:
                rendered = self.template.render(identity=identity, facts=inventory.get("facts", {}))
                loaded = yaml.safe_load(rendered) or {}
            except (TemplateError, yaml.YAMLError) as exc:
                raise HelperError(f"node config template: {exc}") from None
            if not isinstance(loaded, dict):
                raise HelperError("node config template does not render a mapping")
            configuration = loaded
        node_pki = str(inventory.get("pki_dir") or "/etc/directord/pki")
        for key, value in (
            ("grpc_ssl", True),
            ("grpc_ssl_client_auth", True),
            ("grpc_ssl_ca", f"{node_pki}/ca.crt"),
            ("grpc_ssl_cert", f"{node_pki}/certs/{identity}.crt"),
            ("grpc_ssl_key", f"{node_pki}/private/{identity}.key"),
        ):
            configuration.setdefault(key, value)
        certificate = self.pki.sign_pem(request, "client", self.days).decode()
        return Decision(certificate=certificate, ca=self.ca, configuration=configuration)
