"""Component registry and job building.

Components register through the ``directord.components`` entry-point group
(the built-ins are declared the same way in our pyproject). Users' component
files (ours, or written for Directord) are read from ``--components-path``
when that directory and the file are owned by root (or by the service's
user) and writable by no one else: by the server and the CLI, and by a
client only with ``--local-components``. The server ships each file to the
nodes whose jobs use it (a job carries its file's ``FileRef``), and a node
loads what it received with :func:`shipped_component`.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from directord.components.base import Component
from directord.errors import ComponentArgsError, ExecHelp, OrchestrationError
from directord.models import FileRef, JobSpec, SourceFile, job_sha

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

__all__ = ["Component", "ExecHelp", "build_job", "get_component", "known_verbs", "preload"]

log = logging.getLogger(__name__)
USER_COMPONENT_DIR = "/etc/directord/components"
#: A component file the server ships to the nodes may be at most this large.
MAX_COMPONENT_BYTES = 1024 * 1024


@dataclass(slots=True)
class _Unloaded:
    """A verb whose component is not imported yet: loaded when first asked for.

    ``entry_points`` are the registrations of the verb, the one that wins first
    (the last registered): when it fails to load, the next one is tried, and
    then ``fallback``, the first user's component file for the verb.
    """

    entry_points: list[EntryPoint]
    fallback: tuple[type[Component], str, bytes] | None = None


#: verb -> its component class, or what loads it when the verb is first asked for
_REGISTRY: dict[str, type[Component] | _Unloaded] = {}
_INSTANCES: dict[str, Component] = {}
#: where this process reads users' component files (None: nowhere)
_USER_DIR: str | None = USER_COMPONENT_DIR
#: users' component files read here: verb -> (file name, content); the server ships them
_SOURCES: dict[str, tuple[str, bytes]] = {}
#: components received from the server, by the SHA-256 of their file
_SHIPPED: dict[str, Component] = {}


def use_components_from(directory: str | None) -> None:
    """Read users' component files from ``directory`` (None: from nowhere).

    Called before the first job is built or run: the server and the CLI read
    ``--components-path``; a client only with ``--local-components``, as it
    otherwise runs only the component files its server ships.
    """
    global _USER_DIR
    if directory != _USER_DIR:
        _USER_DIR = directory
        _REGISTRY.clear()
        _INSTANCES.clear()
        _SOURCES.clear()


def _untrusted(path: Path) -> str | None:
    """Why code at ``path`` must not be loaded (anyone but root or us could change it)."""
    try:
        st = path.lstat()
    except OSError as exc:
        return f"cannot stat it: {exc.strerror}"
    if stat.S_ISLNK(st.st_mode):
        return "it is a symbolic link"
    if st.st_uid not in (0, os.geteuid()):
        return f"it is owned by uid {st.st_uid}, not root or this service's user"
    if st.st_mode & 0o022:
        return f"it is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _load_user_components(directory: str) -> None:
    path = Path(directory)
    if not path.is_dir():
        return
    # Components run as the daemon (root on nodes): whoever can write them owns the node.
    problem = _untrusted(path)
    if problem:
        log.error("skipped the components directory %s: %s", path, problem)
        return
    for file in sorted(path.glob("*.py")):
        problem = _untrusted(file)
        if problem:
            log.error("skipped component file %s: %s", file, problem)
            continue
        try:
            content = file.read_bytes()
        except OSError as exc:
            log.error("skipped component file %s: %s", file, exc.strerror)
            continue
        if len(content) > MAX_COMPONENT_BYTES:
            log.error("skipped component file %s: over %d bytes", file, MAX_COMPONENT_BYTES)
            continue
        try:
            found = _components_in(file, f"directord_user_{file.stem}")
        except Exception as exc:
            # One bad file must not take every verb (or the daemon) down with it.
            log.error("skipped component file %s: %s: %s", file, type(exc).__name__, exc)
            continue
        for verb, cls in found.items():
            known = _REGISTRY.get(verb)
            if known is None:
                _REGISTRY[verb] = cls
                _SOURCES[verb] = (file.name, content)
            elif isinstance(known, _Unloaded) and known.fallback is None:
                # Used only if the registered component fails to load.
                known.fallback = (cls, file.name, content)


def _components_in(
    file: Path, module_name: str, file_name: str | None = None
) -> dict[str, type[Component]]:
    """The components a Python file defines, by verb (ours, or one written for Directord).

    A Directord component's verb is its file's name: ``file_name`` when the file
    is kept under another (a shipped one, under its hash).
    """
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        return {}
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    found: dict[str, type[Component]] = {}
    for obj in vars(module).values():
        if (
            isinstance(obj, type)
            and issubclass(obj, Component)
            and obj is not Component
            and getattr(obj, "verb", None)
            and obj.__module__ == module_name
        ):
            found.setdefault(obj.verb.upper(), obj)
    legacy_class = vars(module).get("Component")
    if isinstance(legacy_class, type) and not issubclass(legacy_class, Component):
        # A file written for Directord: its class `Component`; its verb, the file's name.
        from directord.components.legacy import ComponentBase, adapt

        if issubclass(legacy_class, ComponentBase) and legacy_class is not ComponentBase:
            verb = Path(file_name or file.name).stem.upper().removeprefix("BUILTIN_")
            found.setdefault(verb, adapt(verb, legacy_class))
    return found


def source_of(verb: str) -> FileRef | None:
    """The file of a user's component this process read (what the server ships), if any."""
    source = _SOURCES.get(verb.upper())
    if source is None:
        return None
    name, content = source
    return FileRef(name, len(content), hashlib.sha256(content).hexdigest())


def source_content(verb: str, sha256: str) -> bytes | None:
    """The content of ``verb``'s component file, if it is still the one with ``sha256``."""
    source = _SOURCES.get(verb.upper())
    if source is None or hashlib.sha256(source[1]).hexdigest() != sha256:
        return None
    return source[1]


def shipped_component(verb: str, ref: FileRef, path: Path) -> Component:
    """The component ``verb`` from the file the server shipped (saved at ``path``).

    Raises:
        ComponentArgsError: the file does not define ``verb``, or fails to load.
    """
    inst = _SHIPPED.get(ref.sha256)
    if inst is not None and inst.verb == verb.upper():
        return inst
    try:
        found = _components_in(path, f"directord_shipped_{ref.sha256[:32]}", ref.name)
    except Exception as exc:
        raise ComponentArgsError(
            f"component {ref.name} from the server fails to load: {type(exc).__name__}: {exc}"
        ) from None
    cls = found.get(verb.upper())
    if cls is None:
        raise ComponentArgsError(f"component file {ref.name} from the server defines no {verb}")
    inst = _SHIPPED[ref.sha256] = cls()
    return inst


def __getattr__(name: str) -> Any:
    # `from directord import components; components.ComponentBase`, as in Directord,
    # without importing the compatibility layer for every command.
    if name == "ComponentBase":
        from directord.components.legacy import ComponentBase

        return ComponentBase
    raise AttributeError(name)


def _entry_points() -> list[EntryPoint]:
    # Imported here: the import costs the CLI's start-up about 20 ms otherwise.
    from importlib.metadata import entry_points

    return list(entry_points(group="directord.components"))


def _registry() -> dict[str, type[Component] | _Unloaded]:
    """Every verb, mapped to its class or to what loads it.

    Components are imported when their verb is first asked for: a command that
    runs one verb imports its module only (``preload`` imports them all).
    """
    if not _REGISTRY:
        unloaded: dict[str, _Unloaded] = {}
        for ep in _entry_points():
            # The last registration of a verb is tried first: it wins, as it always did.
            unloaded.setdefault(ep.name.upper(), _Unloaded([])).entry_points.insert(0, ep)
        _REGISTRY.update(unloaded)
        if _USER_DIR is not None:
            _load_user_components(_USER_DIR)
    return _REGISTRY


def _load(verb: str) -> type[Component] | None:
    """The class of ``verb`` (imported now if it was not), or None if unknown or broken.

    A component that fails to import is logged and forgotten, as if never
    registered: the next registration of the verb, if any, takes its place.
    """
    known = _registry().get(verb)
    if not isinstance(known, _Unloaded):
        return known
    for ep in known.entry_points:
        try:
            cls: type[Component] = ep.load()
        except Exception as exc:
            log.error(
                "skipped component %s (%s): %s: %s", ep.name, ep.value, type(exc).__name__, exc
            )
            continue
        _REGISTRY[verb] = cls
        return cls
    if known.fallback is not None:
        cls, name, content = known.fallback
        _REGISTRY[verb] = cls
        _SOURCES[verb] = (name, content)
        return cls
    del _REGISTRY[verb]
    return None


def _load_all() -> dict[str, type[Component]]:
    """Import every component now; the verbs that loaded, with their classes."""
    loaded: dict[str, type[Component]] = {}
    for verb in list(_registry()):
        cls = _load(verb)
        if cls is not None:
            loaded[verb] = cls
    return loaded


def preload() -> int:
    """Load every component now; returns the number of verbs loaded.

    Daemons call it at start: the first job should not pay for imports, and a
    broken plugin is logged at start rather than at its first job.
    """
    for verb, cls in _load_all().items():
        if verb not in _INSTANCES:
            try:
                _INSTANCES[verb] = cls()
            except Exception as exc:
                log.error("skipped component %s: %s: %s", verb, type(exc).__name__, exc)
                del _REGISTRY[verb]
    return len(_INSTANCES)


def known_verbs() -> list[str]:
    """Every verb that can be used in an orchestration.

    It imports every component, so that a broken one is not listed.
    """
    return sorted(_load_all())


def get_component(verb: str) -> Component:
    """The (cached) component instance for a verb.

    Raises:
        ComponentArgsError: unknown verb; the message lists the closest known ones.
    """
    key = verb.upper()
    inst = _INSTANCES.get(key)
    if inst is not None:
        return inst
    cls = _load(key)
    if cls is None:
        close = difflib.get_close_matches(key, known_verbs(), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ComponentArgsError(
            f"unknown verb {verb!r}{hint}; known verbs: {', '.join(known_verbs())}"
        )
    inst = _INSTANCES[key] = cls()
    return inst


def job_key(job: Mapping[str, Any]) -> str:
    """What building a job depends on, as one string: its verb, arguments and vars.

    Jobs with the same key build the same way (in the same directory), so an
    orchestration that repeats a job is checked and prepared once.
    """
    return json.dumps(
        [str(job["verb"]), str(job.get("args", "")), job.get("vars")], sort_keys=True, default=repr
    )


def build_job(
    verb: str,
    argstring: str,
    *,
    job_vars: Mapping[str, Any] | None = None,
    name: str = "",
    assign: tuple[str, ...] = (),
    skip_cache: bool = False,
    cwd: str = "/",
    prepare: bool = True,
    files: Sequence[FileRef] = (),
    where: str = "<exec>",
    line: int | None = None,
) -> JobSpec:
    """Parse and prepare one job; raise OrchestrationError naming where it came from.

    With ``prepare`` (the CLI and the library) the submit-side step runs here: it
    finds and hashes a COPY's files with this process's rights. Without it (the
    server, which never opens a user's path) ``files`` are the job's files as the
    submitter found and uploaded them.

    Raises:
        OrchestrationError: unknown verb or bad arguments (``where``/``line`` say where).
        ExecHelp: ``--exec-help`` was given.
    """
    if job_vars is not None and not isinstance(job_vars, Mapping):
        raise OrchestrationError("vars must be a mapping", path=where, line=line)
    sources: list[SourceFile] = []
    try:
        component = get_component(verb)
        options = component.parse(argstring, job_vars)
        if prepare:
            options = component.prepare(options, cwd)
            sources = component.source_files(options, cwd)
            files = [s.ref for s in sources]
        elif files and not component.takes_files:
            raise ComponentArgsError(f"{verb.upper()} takes no files")
    except ComponentArgsError as exc:
        raise OrchestrationError(str(exc), path=where, line=line) from None
    timeout = float(options.pop("timeout"))
    run_once = bool(options.pop("run_once"))
    skip = bool(options.pop("skip_cache")) or skip_cache
    refs = tuple(files)
    return JobSpec(
        verb=verb.upper(),
        options=options,
        sha=job_sha(verb.upper(), options, timeout, run_once, refs),
        timeout=timeout,
        run_once=run_once,
        skip_cache=skip,
        name=name,
        assign=assign,
        vars=dict(job_vars or {}),
        files=refs,
        sources=tuple(sources),
        component=source_of(verb),
    )
