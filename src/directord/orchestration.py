"""Orchestration files: load, check and normalise them (with file and line for errors).

Format: a YAML list; each item has ``jobs`` (a list of one-verb maps
``VERB: "args"`` with optional ``vars``, ``name``, ``assign``) and optional
``targets``, ``async`` and ``name``. Normalised form, as the API takes it::

    {"name", "targets", "async", "source", "jobs": [{"verb", "args", "vars",
     "name", "assign", "line"}]}
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from directord.components import ExecHelp, build_job, job_key
from directord.errors import OrchestrationError

# libyaml's loader when PyYAML was built with it: the pure-Python one costs
# about 0.2 ms a job, most of what the CLI spends on a large orchestration.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ITEM_KEYS = {"jobs", "targets", "async", "name"}
JOB_KEYS = {"vars", "name", "assign"}


class _Walker:
    """Turns composed YAML nodes into normalised orchestrations, keeping lines."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.loader = _Loader(text)

    def err(self, node: yaml.Node | None, message: str) -> OrchestrationError:
        line = node.start_mark.line + 1 if node is not None else None
        return OrchestrationError(message, path=self.source, line=line)

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def strings(self, node: yaml.Node, what: str) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.err(node, f"{what} must be a list of node names")
        out = []
        for item in node.value:
            value = self.value(item)
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise self.err(item, f"{what} entries must be node names")
            out.append(str(value))
        return out

    def load(self) -> list[dict[str, Any]]:
        try:
            root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise OrchestrationError(
                f"YAML error: {exc.problem or exc.context}",
                path=self.source,
                line=mark.line + 1 if mark else None,
            ) from None
        except yaml.YAMLError as exc:
            raise OrchestrationError(f"YAML error: {exc}", path=self.source) from None
        finally:
            self.loader.dispose()
        if root is None:
            raise OrchestrationError("empty orchestration file", path=self.source)
        if not isinstance(root, yaml.SequenceNode):
            raise self.err(root, "an orchestration file is a list of items with `jobs`")
        return [self.item(node) for node in root.value]

    def item(self, node: yaml.Node) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, "each orchestration must be a mapping with `jobs`")
        out: dict[str, Any] = {
            "name": "",
            "targets": [],
            "async": False,
            "source": self.source,
            "line": node.start_mark.line + 1,
            "jobs": None,
        }
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key not in ITEM_KEYS:
                raise self.err(
                    key_node,
                    f"unknown key {key!r} (expected one of {', '.join(sorted(ITEM_KEYS))})",
                )
            if key == "jobs":
                if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                    raise self.err(value_node, "`jobs` must be a non-empty list")
                out["jobs"] = [self.job(j) for j in value_node.value]
            elif key == "targets":
                out["targets"] = self.strings(value_node, "targets")
            elif key == "async":
                value = self.value(value_node)
                if not isinstance(value, bool):
                    raise self.err(value_node, "`async` must be true or false")
                out["async"] = value
            else:
                out["name"] = str(self.value(value_node) or "")
        if out["jobs"] is None:
            raise self.err(node, "orchestration has no `jobs`")
        return out

    def job(self, node: yaml.Node) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, 'a job must be a mapping like `RUN: "command"`')
        job: dict[str, Any] = {
            "vars": {},
            "name": "",
            "assign": [],
            "line": node.start_mark.line + 1,
        }
        verbs = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key == "vars":
                if not isinstance(value_node, yaml.MappingNode):
                    raise self.err(value_node, "`vars` must be a mapping")
                job["vars"] = self.value(value_node)
            elif key == "name":
                job["name"] = str(self.value(value_node) or "")
            elif key == "assign":
                job["assign"] = self.strings(value_node, "assign")
            else:
                if not isinstance(value_node, yaml.ScalarNode):
                    raise self.err(value_node, f"the arguments of {key} must be a string")
                # The text as written: YAML must not turn `yes` into True or 0x10 into 16.
                args = value_node.value if self.value(value_node) is not None else ""
                verbs.append((str(key), args, key_node))
        if len(verbs) != 1:
            raise self.err(
                node,
                f"a job needs exactly one verb, found {len(verbs)}"
                + (f" ({', '.join(v[0] for v in verbs)})" if verbs else ""),
            )
        job["verb"], job["args"], _ = verbs[0]
        return job


def load_text(text: str, source: str) -> list[dict[str, Any]]:
    """Parse orchestration YAML text into the normalised form."""
    return _Walker(text, source).load()


SHIPPED_DIR = Path(__file__).parent / "orchestrations"


def shipped(path: str) -> str:
    """``path``, or the orchestration of that name shipped with directord.

    A bare file name that does not exist here (``key-rotation.yaml``) names a
    packaged orchestration.
    """
    candidate = SHIPPED_DIR / path
    if not Path(path).exists() and "/" not in path and candidate.is_file():
        return str(candidate)
    return path


def load_files(paths: Sequence[str]) -> list[dict[str, Any]]:
    """Read and parse orchestration files.

    Raises:
        OrchestrationError: unreadable file, YAML error, bad structure (with file and line).
    """
    out: list[dict[str, Any]] = []
    for path in paths:
        path = shipped(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise OrchestrationError(f"cannot read: {exc.strerror}", path=path) from None
        out.extend(load_text(text, path))
    return out


def from_python(orchestrations: Any, source: str = "<library>") -> list[dict[str, Any]]:
    """Normalise orchestrations given as Python data (the library's input)."""
    return load_text(yaml.safe_dump(orchestrations, sort_keys=False), source)


def check(orchestrations: list[dict[str, Any]]) -> None:
    """Build every job without side effects, so errors surface before submitting.

    Raises:
        OrchestrationError: unknown verb or bad arguments, with file and line.
        ExecHelp: a job asked for ``--exec-help``.
    """
    checked: set[str] = set()
    for orch in orchestrations:
        for job in orch["jobs"]:
            # A job written many times is checked once: the same verb, arguments
            # and vars build the same way (an error names the first occurrence).
            key = job_key(job)
            if key in checked:
                continue
            checked.add(key)
            build_job(
                job["verb"],
                job["args"],
                job_vars=job["vars"],
                prepare=False,
                where=orch["source"],
                line=job["line"],
            )


__all__ = ["ExecHelp", "check", "from_python", "load_files", "load_text"]
