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

from directord.components import ExecHelp, build_job, job_key
from directord.errors import OrchestrationError


def load_text(text: str, source: str) -> list[dict[str, Any]]:
    """Parse orchestration YAML text into the normalised form."""
    # Imported here: yaml costs every command that reads no orchestration file ~10 ms.
    from directord._orchestration_yaml import Walker

    return Walker(text, source).load()


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
    import yaml

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
