"""Bootstrap catalogs: Directord's format, read with file and line for every error.

A catalog is a YAML mapping. Two sections name hosts:

    directord_server:   {targets: [...], args: {...}, vars: {...}, jobs: [...]}
    directord_clients:  {targets: [...], args: {...}, vars: {...}, jobs: [...]}

A target is ``{host, port, username, name, vars}``; ``args`` gives the
defaults of ``port`` and ``username``. A job is one of ``RUN: COMMAND``,
``ADD: LOCAL REMOTE``, ``GET: REMOTE LOCAL`` (Directord's three) or
``LOCAL: COMMAND`` (ours: a command on the machine running bootstrap, e.g.
to sign a node's certificate request). Jobs may be nested lists.

Several files are merged as Directord merges them: mappings key by key,
lists extended, other values replaced by the later file. Every other
top-level key is a template variable. Each step is rendered with Jinja2 just
before it runs, over the merged catalog plus the section's and the target's
``vars``, ``directord_bootstrap`` (the target: host, port, username, name and
its other keys), ``directord_cli`` (this machine's directord, for
LOCAL steps) and ``become`` (``"sudo -n "`` unless the user is root).
"""

from __future__ import annotations

import getpass
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from directord.errors import OrchestrationError
from directord.security.identities import identity_problem

SECTIONS = ("directord_server", "directord_clients")
STEP_KINDS = ("RUN", "ADD", "GET", "LOCAL")
SECTION_KEYS = {"targets", "args", "vars", "jobs"}
TARGET_KEYS = {"host", "port", "username", "name", "vars"}
SHIPPED_DIR = Path(__file__).parent / "catalogs"
MAX_CATALOG_BYTES = 4 * 1024 * 1024


class CatalogError(OrchestrationError):
    """A bootstrap catalog is unreadable or malformed (file and line in the message)."""

    code: ClassVar[str] = "catalog"


@dataclass(frozen=True, slots=True)
class Step:
    """One job of a host: its kind, its unrendered text, and where it was written."""

    kind: str
    text: str
    source: str
    line: int

    @property
    def where(self) -> str:
        """``file:line KIND``, for progress and error lines."""
        return f"{self.source}:{self.line} {self.kind}"


@dataclass(slots=True)
class Host:
    """One target of a section, with the steps it runs and its template variables."""

    section: str
    host: str
    port: int
    username: str
    name: str
    steps: list[Step]
    target: dict[str, Any] = field(default_factory=dict)
    vars: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """How progress lines name the host."""
        where = f"{self.username}@{self.host}:{self.port}"
        return f"{self.name} ({where})" if self.name else where


@dataclass(slots=True)
class Catalog:
    """The merged catalog (template variables) and the hosts, server section first."""

    data: dict[str, Any]
    hosts: list[Host]


def shipped(path: str) -> str:
    """``path``, or the catalog of that name shipped with directord (``grpc-mtls.yaml``)."""
    candidate = SHIPPED_DIR / path
    if not Path(path).exists() and "/" not in path and candidate.is_file():
        return str(candidate)
    return path


def merge(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Merge ``new`` into ``base`` as Directord does: mappings deep, lists extended."""
    for key, value in new.items():
        if key in base and isinstance(base[key], dict) and isinstance(value, dict):
            merge(base[key], value)
        elif key in base and isinstance(base[key], list) and isinstance(value, list):
            base[key].extend(value)
        else:
            base[key] = value
    return base


class _File:
    """One catalog file: its data, and its jobs per section with their lines."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            with open(path, "rb") as fh:
                raw = fh.read(MAX_CATALOG_BYTES + 1)
        except OSError as exc:
            raise CatalogError(f"cannot read: {exc.strerror}", path=path) from None
        if len(raw) > MAX_CATALOG_BYTES:
            raise CatalogError(f"larger than {MAX_CATALOG_BYTES} bytes", path=path)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CatalogError(f"not UTF-8 (byte {exc.start})", path=path) from None
        self.loader = yaml.SafeLoader(text)
        self.data: dict[str, Any] = {}
        self.steps: dict[str, list[Step]] = {s: [] for s in SECTIONS}
        try:
            # Directord's catalogs may end with `---`: every document is merged in.
            while self.loader.check_node():
                node = self.loader.get_node()
                if node is not None:
                    merge(self.data, self.document(node))
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise CatalogError(
                f"YAML error: {exc.problem or exc.context}",
                path=path,
                line=mark.line + 1 if mark else None,
            ) from None
        except yaml.YAMLError as exc:
            raise CatalogError(f"YAML error: {exc}", path=path) from None
        finally:
            self.loader.dispose()

    def err(self, node: yaml.Node, message: str) -> CatalogError:
        return CatalogError(message, path=self.path, line=node.start_mark.line + 1)

    def document(self, node: yaml.Node) -> dict[str, Any]:
        if isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null"):
            return {}
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, "a catalog is a mapping (directord_server, directord_clients)")
        for key_node, value_node in node.value:
            if key_node.value in SECTIONS:
                self.section(key_node.value, value_node)
        data = self.loader.construct_object(node, deep=True)
        if not all(isinstance(k, str) for k in data):
            raise self.err(node, "catalog keys must be strings")
        return dict(data)

    def section(self, name: str, node: yaml.Node) -> None:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, f"`{name}` must be a mapping with `targets` and `jobs`")
        for key_node, value_node in node.value:
            key = key_node.value
            if key not in SECTION_KEYS:
                raise self.err(
                    key_node,
                    f"{name}: unknown key {key!r} "
                    f"(expected one of {', '.join(sorted(SECTION_KEYS))})",
                )
            if key == "jobs":
                if not isinstance(value_node, yaml.SequenceNode):
                    raise self.err(value_node, f"{name}: `jobs` must be a list")
                self.jobs(name, value_node)
            elif key == "targets":
                if not isinstance(value_node, yaml.SequenceNode):
                    raise self.err(value_node, f"{name}: `targets` must be a list")
                for target in value_node.value:
                    self.target(name, target)
            elif not isinstance(value_node, yaml.MappingNode):
                raise self.err(value_node, f"{name}: `{key}` must be a mapping")

    def jobs(self, section: str, node: yaml.SequenceNode) -> None:
        for item in node.value:
            if isinstance(item, yaml.SequenceNode):  # nested lists are flattened
                self.jobs(section, item)
                continue
            if not isinstance(item, yaml.MappingNode) or len(item.value) != 1:
                raise self.err(item, 'a job is one `KIND: "text"` (RUN, ADD, GET or LOCAL)')
            key_node, value_node = item.value[0]
            kind = key_node.value
            if kind not in STEP_KINDS:
                raise self.err(
                    key_node, f"unknown job {kind!r} (expected one of {', '.join(STEP_KINDS)})"
                )
            if not isinstance(value_node, yaml.ScalarNode) or not value_node.value.strip():
                raise self.err(value_node, f"{kind} needs its text (a string)")
            if kind in ("ADD", "GET") and len(value_node.value.split(None, 1)) != 2:
                raise self.err(
                    value_node,
                    f"{kind} takes two paths: "
                    + ("LOCAL REMOTE" if kind == "ADD" else "REMOTE LOCAL"),
                )
            line = value_node.start_mark.line + 1
            self.steps[section].append(Step(kind, value_node.value, self.path, line))

    def target(self, section: str, node: yaml.Node) -> None:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, f"{section}: a target is a mapping with `host`")
        value = self.loader.construct_object(node, deep=True)
        if not isinstance(value.get("host"), str) or not value["host"].strip():
            raise self.err(node, f"{section}: a target needs `host` (a string)")
        port = value.get("port", 22)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise self.err(node, f"{section}: `port` must be a number from 1 to 65535")
        for key in ("username", "name"):
            if key in value and not isinstance(value[key], str):
                raise self.err(node, f"{section}: `{key}` must be a string")
        if value.get("name"):
            problem = identity_problem(value["name"])
            if problem:
                raise self.err(node, f"{section}: target name {value['name']!r}: {problem}")
        if "vars" in value and not isinstance(value["vars"], dict):
            raise self.err(node, f"{section}: a target's `vars` must be a mapping")


def load(paths: Sequence[str]) -> Catalog:
    """Read, check and merge catalog files into hosts with their steps.

    Raises:
        CatalogError: unreadable file, YAML error, bad structure (with file and line),
            or no host with jobs at all.
    """
    if not paths:
        raise CatalogError("no catalog given (--catalog FILE)", path="<bootstrap>")
    data: dict[str, Any] = {}
    steps: dict[str, list[Step]] = {s: [] for s in SECTIONS}
    for path in paths:
        one = _File(shipped(path))
        merge(data, one.data)
        for section in SECTIONS:
            steps[section].extend(one.steps[section])
    hosts: list[Host] = []
    for section in SECTIONS:
        entry = data.get(section) or {}
        if not steps[section]:
            continue  # Directord: a section without jobs only names hosts for templates
        args = entry.get("args") or {}
        for target in entry.get("targets") or []:
            hosts.append(
                Host(
                    section=section,
                    host=target["host"],
                    port=int(target.get("port", args.get("port", 22))),
                    username=str(target.get("username", args.get("username", getpass.getuser()))),
                    name=str(target.get("name", "")),
                    steps=steps[section],
                    target=target,
                    vars={**(entry.get("vars") or {}), **(target.get("vars") or {})},
                )
            )
    if not hosts:
        raise CatalogError(
            "no host to bootstrap: no section has both `targets` and `jobs`",
            path=", ".join(paths),
        )
    return Catalog(data, hosts)


def template_context(catalog: Catalog, host: Host) -> dict[str, Any]:
    """What a step of ``host`` is rendered over."""
    current = {
        **host.target,
        "host": host.host,
        "port": host.port,
        "username": host.username,
        "name": host.name,
    }
    return {
        **catalog.data,
        **host.vars,
        "directord_bootstrap": current,
        "become": "" if host.username == "root" else "sudo -n ",
        "directord_catalogs": str(SHIPPED_DIR),
        "directord_cli": local_cli(),
    }


def local_cli() -> str:
    """How a LOCAL step calls this machine's directord: the one running bootstrap."""
    return f"{shlex.quote(os.path.abspath(sys.executable))} -m directord"
