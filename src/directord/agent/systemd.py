"""An asyncio client of systemd's manager over D-Bus (``org.freedesktop.systemd1``).

The node side of ``directord units`` and of the SERVICE component (issue 11). It
talks to systemd's D-Bus API through dbus-fast's low-level messages; it never
parses ``systemctl`` output.

What it offers (:class:`SystemdManager`)::

    list_units()            ListUnits            -> [UnitRow]
    list_unit_files()       ListUnitFiles        -> [UnitFileRow]
    unit_status(name)       LoadUnit + GetAll    -> UnitStatus
    start/stop/restart/reload(name)              -> JobResult, read from JobRemoved
    enable/disable(names, now=)                  -> EnableResult (then Reload; --now starts/stops)
    daemon_reload()         Reload
    kill(name, whom, signal)                     KillUnit
    reset_failed(name|None) ResetFailedUnit / ResetFailed
    freeze(name) / thaw(name)                    FreezeUnit / ThawUnit
    watch(patterns)         PropertiesChanged on unit objects -> UnitChange (async iterator)

Jobs: the client subscribes to ``JobRemoved`` once, when it connects, so the
signal of a job that ends before its method call's reply has been read is kept
for that call, not lost. A job's result is systemd's own word (``done``,
``failed``, ``timeout``, ``dependency``, ``canceled``, ``skipped`` ...); only
``done`` is a success. Waiting longer than the job timeout raises
:class:`SystemdTimeout` (the job itself goes on in systemd).

Signals are accepted only from the bus name that owns ``org.freedesktop.systemd1``
(tracked through ``NameOwnerChanged``): any bus client may emit a signal with any
path, and a forged ``JobRemoved`` must not decide a job's result.

Bus address: the system bus by default; tests pass another D-Bus address such as
``unix:path=/proc/<pid1>/root/run/dbus/system_bus_socket`` to reach the systemd of
a container from the host.

Errors (to move into ``directord.errors`` when issue 11 lands)::

    DirectordError
     +-- SystemdError               systemd refused or failed a call (names the unit)
          +-- NoSystemd             no system bus, or no systemd on it
          +-- NoSuchUnit            the unit does not exist (names it)
          +-- NotSupported          systemd cannot do this here (freeze on cgroup v1)
          +-- SystemdTimeout        a job did not end within the wait
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fnmatch
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, ClassVar, Self

from directord.errors import DirectordError, MissingDependencyError

try:
    from dbus_fast import BusType, Message, MessageType, Variant
    from dbus_fast.aio import MessageBus
except ImportError as exc:  # pragma: no cover - the extra is not installed
    raise MissingDependencyError("pip install directord[systemd]") from exc

log = logging.getLogger(__name__)

SYSTEMD = "org.freedesktop.systemd1"
MANAGER_PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT = "org.freedesktop.systemd1.Unit"
UNIT_PREFIX = "/org/freedesktop/systemd1/unit/"
PROPERTIES = "org.freedesktop.DBus.Properties"
DBUS = "org.freedesktop.DBus"

# Unit types whose objects carry a ``Result`` property (and, for some, MainPID),
# by the D-Bus interface systemd gives them.
_TYPE_INTERFACES = {
    t: f"org.freedesktop.systemd1.{t.capitalize()}"
    for t in ("service", "socket", "mount", "swap", "timer", "path", "automount", "scope")
}
_JOB_MODE = "replace"
_WHOM = frozenset({"main", "control", "all"})


# ---- errors ------------------------------------------------------------------------------


class SystemdError(DirectordError):
    """systemd refused or failed a call.

    Attributes:
        unit: the unit the call was about, if any.
        dbus_name: the D-Bus error name systemd answered with, if any.
    """

    code: ClassVar[str] = "systemd"

    def __init__(self, message: str, *, unit: str | None = None, dbus_name: str | None = None):
        self.unit = unit
        self.dbus_name = dbus_name
        super().__init__(message)


class NoSystemd(SystemdError, ConnectionError):
    """There is no system bus, or no systemd on it (a node without systemd).

    Attributes:
        address: the bus address tried.
    """

    code: ClassVar[str] = "no-systemd"

    def __init__(self, address: str, reason: str):
        self.address = address
        super().__init__(f"no systemd: {reason} ({address})")


class NoSuchUnit(SystemdError, LookupError):
    """The unit does not exist on this node."""

    code: ClassVar[str] = "no-such-unit"

    def __init__(self, unit: str, dbus_name: str | None = None):
        super().__init__(f"no such unit: {unit}", unit=unit, dbus_name=dbus_name)


class NotSupported(SystemdError):
    """systemd cannot do this here (for example freezing a unit without cgroup v2)."""

    code: ClassVar[str] = "systemd-not-supported"


class SystemdTimeout(SystemdError, TimeoutError):
    """A job did not end within the wait; it may still be running in systemd."""

    code: ClassVar[str] = "systemd-timeout"


# ---- values ------------------------------------------------------------------------------


class JobResult(enum.StrEnum):
    """How a systemd job ended (the ``result`` of ``JobRemoved``); only DONE is success."""

    DONE = "done"
    FAILED = "failed"
    TIMEOUT = "timeout"
    DEPENDENCY = "dependency"
    CANCELED = "canceled"
    SKIPPED = "skipped"
    INVALID = "invalid"
    ASSERT = "assert"
    UNSUPPORTED = "unsupported"
    COLLECTED = "collected"
    ONCE = "once"
    FROZEN = "frozen"

    @classmethod
    def parse(cls, text: str) -> JobResult:
        """The member for systemd's word; a word this version does not know is FAILED."""
        try:
            return cls(text)
        except ValueError:
            log.warning("unknown systemd job result %r, taken as failed", text)
            return cls.FAILED


@dataclass(frozen=True, slots=True)
class UnitRow:
    """One row of ``list_units`` (``systemctl list-units``)."""

    unit: str
    load: str
    active: str
    sub: str
    description: str


@dataclass(frozen=True, slots=True)
class UnitFileRow:
    """One row of ``list_unit_files``: a unit file's name and its enablement state."""

    unit: str
    state: str


@dataclass(frozen=True, slots=True)
class UnitStatus:
    """What ``units status`` shows of one unit.

    Attributes:
        since: when the unit last entered the active state (None if never).
        main_pid: the main process (services), None when there is none.
        result: the last run's result (``success``, ``exit-code`` ...); None for
            unit types that have none (targets, devices, slices).
    """

    unit: str
    description: str
    load: str
    active: str
    sub: str
    main_pid: int | None
    since: datetime | None
    unit_file_state: str
    result: str | None
    freezer_state: str


@dataclass(frozen=True, slots=True)
class UnitFileChange:
    """One change an enable or disable made (``symlink``, ``unlink`` ...)."""

    kind: str
    path: str
    source: str


@dataclass(frozen=True, slots=True)
class EnableResult:
    """What enable/disable changed and, with ``now``, each start/stop job's result."""

    changes: tuple[UnitFileChange, ...]
    carries_install_info: bool
    jobs: dict[str, JobResult]


@dataclass(frozen=True, slots=True)
class UnitChange:
    """A unit's state changed (from PropertiesChanged, or its state on replay).

    Attributes:
        previous: the active state before, if this watch knew it.
    """

    unit: str
    active: str
    sub: str
    previous: str | None


# ---- helpers -----------------------------------------------------------------------------


def unit_path_name(path: str) -> str | None:
    """The unit name of a unit object path (systemd escapes bytes as ``_xx``), else None."""
    if not path.startswith(UNIT_PREFIX):
        return None
    label = path[len(UNIT_PREFIX) :]
    return re.sub(r"_([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), label)


def _timestamp(usec: int) -> datetime | None:
    return datetime.fromtimestamp(usec / 1e6, tz=UTC) if usec else None


def _value(props: dict[str, Variant], key: str, default: Any = None) -> Any:
    variant = props.get(key)
    return default if variant is None else variant.value


def _match_rule(**keys: str) -> str:
    return ",".join(f"{k}='{v}'" for k, v in keys.items())


# ---- the client --------------------------------------------------------------------------


class SystemdManager:
    """A connection to one systemd manager; ``async with SystemdManager() as sd: ...``.

    The lifecycle is ``connect()`` / ``close()`` rather than the drivers' ``start()``:
    ``start(unit)`` is the verb users know from ``systemctl`` and ``units start``.

    Args:
        address: a D-Bus address; None for the system bus.
        job_timeout: default seconds to wait for a job's ``JobRemoved``.
        call_timeout: seconds to wait for any method reply.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        job_timeout: float = 300.0,
        call_timeout: float = 30.0,
    ) -> None:
        self.address = address
        self.job_timeout = job_timeout
        self.call_timeout = call_timeout
        self._bus: MessageBus | None = None
        self._owner: str | None = None
        self._subscribed = False
        # JobRemoved bookkeeping: see _on_message.
        self._waiters: dict[str, asyncio.Future[JobResult]] = {}
        self._early: dict[str, JobResult] = {}
        self._inflight = 0
        self._watches: set[UnitWatch] = set()
        self._disconnect_task: asyncio.Task[None] | None = None

    @property
    def _where(self) -> str:
        return self.address or "the system bus"

    # -- lifecycle --

    async def connect(self) -> Self:
        """Connect, check that systemd is on the bus, and listen for job results.

        Raises:
            NoSystemd: the bus cannot be reached, or systemd is not on it.
        """
        try:
            bus = MessageBus(bus_address=self.address, bus_type=BusType.SYSTEM)
            self._bus = await asyncio.wait_for(bus.connect(), self.call_timeout)
        except (OSError, TimeoutError, ValueError) as exc:
            # ValueError covers dbus-fast's AuthError and InvalidAddressError.
            raise NoSystemd(self._where, f"cannot connect to the bus: {exc}") from exc
        self._bus.add_message_handler(self._on_message)
        try:
            (self._owner,) = await self._call(
                DBUS, "/org/freedesktop/DBus", DBUS, "GetNameOwner", "s", [SYSTEMD]
            )
        except SystemdError as exc:
            await self.close()
            raise NoSystemd(self._where, f"{SYSTEMD} is not on the bus") from exc
        await self._add_match(
            type="signal", sender=DBUS, interface=DBUS, member="NameOwnerChanged", arg0=SYSTEMD
        )
        await self._add_match(
            type="signal", sender=SYSTEMD, interface=MANAGER, member="JobRemoved",
            path=MANAGER_PATH,
        )  # fmt: skip
        self._disconnect_task = asyncio.create_task(self._on_disconnect(self._bus))
        log.debug("connected to systemd at %s (%s)", self._where, self._owner)
        return self

    async def _on_disconnect(self, bus: MessageBus) -> None:
        """Fail pending job waits and end every watch with an error when the bus goes.

        A node's bus goes away when its dbus-daemon stops or the node reboots; a
        watcher then sees SystemdError and reconnects (with replay) rather than wait
        for changes that will never come.
        """
        with contextlib.suppress(Exception):
            await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
        if self._bus is bus:
            log.info("lost the connection to systemd at %s", self._where)
            self._fail_all(SystemdError(f"lost the connection to systemd at {self._where}"))

    def _fail_all(self, error: SystemdError) -> None:
        for watch in list(self._watches):
            watch.close(error)
        for fut in self._waiters.values():
            if not fut.done():
                fut.set_exception(error)
        self._waiters.clear()

    async def close(self) -> None:
        """Stop every watch and disconnect; pending job waits raise SystemdError."""
        for watch in list(self._watches):
            watch.close()
        bus, self._bus = self._bus, None
        task, self._disconnect_task = self._disconnect_task, None
        if bus is not None:
            bus.disconnect()
        if task is not None:
            # The task ends once dbus-fast has finalized the connection. Cancelling it
            # earlier would cancel dbus-fast's own disconnect future, which it awaits.
            try:
                await asyncio.wait_for(asyncio.shield(task), 5.0)
            except TimeoutError:
                task.cancel()
        self._fail_all(SystemdError("connection to systemd closed"))

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- queries --

    async def list_units(self) -> list[UnitRow]:
        """Every unit systemd has loaded, as ``systemctl list-units --all`` shows them."""
        (rows,) = await self._manager("ListUnits")
        return sorted((UnitRow(r[0], r[2], r[3], r[4], r[1]) for r in rows), key=lambda r: r.unit)

    async def list_unit_files(self) -> list[UnitFileRow]:
        """Every unit file and its state (``enabled``, ``disabled``, ``static`` ...)."""
        (rows,) = await self._manager("ListUnitFiles")
        return sorted(
            (UnitFileRow(path.rsplit("/", 1)[-1], state) for path, state in rows),
            key=lambda r: r.unit,
        )

    async def unit_status(self, name: str) -> UnitStatus:
        """A unit's state, main pid, since when, enablement and last result.

        Raises:
            NoSuchUnit: systemd has no such unit, loaded or on disk.
        """
        (path,) = await self._manager("LoadUnit", "s", [name], unit=name)
        props = await self._get_all(path, UNIT, name)
        if _value(props, "LoadState") == "not-found":
            raise NoSuchUnit(name)
        extra: dict[str, Variant] = {}
        interface = _TYPE_INTERFACES.get(name.rsplit(".", 1)[-1])
        if interface is not None:
            extra = await self._get_all(path, interface, name)
        main_pid = int(_value(extra, "MainPID", 0))
        return UnitStatus(
            unit=name,
            description=str(_value(props, "Description", "")),
            load=str(_value(props, "LoadState", "")),
            active=str(_value(props, "ActiveState", "")),
            sub=str(_value(props, "SubState", "")),
            main_pid=main_pid or None,
            since=_timestamp(int(_value(props, "ActiveEnterTimestamp", 0))),
            unit_file_state=str(_value(props, "UnitFileState", "")),
            result=_value(extra, "Result"),
            freezer_state=str(_value(props, "FreezerState", "")),
        )

    # -- jobs --

    async def start(self, name: str, timeout: float | None = None) -> JobResult:
        """Start a unit and wait for its job's result (``done`` on success)."""
        return await self._job("StartUnit", name, timeout)

    async def stop(self, name: str, timeout: float | None = None) -> JobResult:
        """Stop a unit and wait for its job's result."""
        return await self._job("StopUnit", name, timeout)

    async def restart(self, name: str, timeout: float | None = None) -> JobResult:
        """Restart a unit and wait for its job's result."""
        return await self._job("RestartUnit", name, timeout)

    async def reload(self, name: str, timeout: float | None = None) -> JobResult:
        """Reload a unit (its ExecReload) and wait for its job's result."""
        return await self._job("ReloadUnit", name, timeout)

    async def _job(self, method: str, name: str, timeout: float | None) -> JobResult:
        """Call a job method and wait for the JobRemoved signal naming its job path.

        Raises:
            NoSuchUnit: the unit does not exist.
            SystemdTimeout: no result within ``timeout`` seconds.
        """
        await self._subscribe()
        # While a call's reply is unread, _on_message keeps JobRemoved signals of
        # unknown jobs in _early: the job may end before this coroutine resumes.
        self._inflight += 1
        job = ""
        try:
            (job,) = await self._manager(method, "ss", [name, _JOB_MODE], unit=name)
        finally:
            self._inflight -= 1
            # No await from here to the waiter's registration: nothing is lost.
            result = self._early.pop(job, None)
            if not self._inflight:
                self._early.clear()
        if result is None:
            fut: asyncio.Future[JobResult] = asyncio.get_running_loop().create_future()
            self._waiters[job] = fut
            wait = self.job_timeout if timeout is None else timeout
            try:
                result = await asyncio.wait_for(fut, wait)
            except TimeoutError as exc:
                raise SystemdTimeout(
                    f"{method} {name}: no result after {wait:g}s", unit=name
                ) from exc
            finally:
                self._waiters.pop(job, None)
        log.debug("%s %s: %s", method, name, result)
        return result

    # -- unit files --

    async def enable(self, names: Sequence[str], now: bool = False) -> EnableResult:
        """Enable unit files, reload systemd, and with ``now`` start them too.

        Raises:
            NoSuchUnit: a unit file does not exist.
        """
        install, changes = await self._manager(
            "EnableUnitFiles", "asbb", [list(names), False, False], unit=_one(names)
        )
        await self.daemon_reload()
        jobs = {n: await self.start(n) for n in names} if now else {}
        return EnableResult(_changes(changes), bool(install), jobs)

    async def disable(self, names: Sequence[str], now: bool = False) -> EnableResult:
        """Disable unit files, reload systemd, and with ``now`` stop them too."""
        (changes,) = await self._manager(
            "DisableUnitFiles", "asb", [list(names), False], unit=_one(names)
        )
        await self.daemon_reload()
        jobs = {n: await self.stop(n) for n in names} if now else {}
        return EnableResult(_changes(changes), False, jobs)

    async def mask(self, names: Sequence[str]) -> tuple[UnitFileChange, ...]:
        """Mask units (links to /dev/null: they cannot be started), then reload systemd."""
        (changes,) = await self._manager(
            "MaskUnitFiles", "asbb", [list(names), False, True], unit=_one(names)
        )
        await self.daemon_reload()
        return _changes(changes)

    async def unmask(self, names: Sequence[str]) -> tuple[UnitFileChange, ...]:
        """Unmask units, then reload systemd."""
        (changes,) = await self._manager(
            "UnmaskUnitFiles", "asb", [list(names), False], unit=_one(names)
        )
        await self.daemon_reload()
        return _changes(changes)

    async def daemon_reload(self) -> None:
        """Reload systemd's configuration (``systemctl daemon-reload``); returns when done."""
        await self._manager("Reload")

    # -- processes and state --

    async def kill(self, name: str, whom: str = "all", signal: int = 15) -> None:
        """Send a signal to a unit's processes (``whom``: main, control or all)."""
        if whom not in _WHOM:
            raise ValueError(f"whom must be one of {sorted(_WHOM)}, not {whom!r}")
        await self._manager("KillUnit", "ssi", [name, whom, signal], unit=name)

    async def reset_failed(self, name: str | None = None) -> None:
        """Reset the failed state of one unit, or of every unit when ``name`` is None."""
        if name is None:
            await self._manager("ResetFailed")
        else:
            await self._manager("ResetFailedUnit", "s", [name], unit=name)

    async def freeze(self, name: str) -> None:
        """Freeze a unit's processes (cgroup freezer).

        Raises:
            NotSupported: the unit or the cgroup setup does not allow it.
        """
        await self._manager("FreezeUnit", "s", [name], unit=name)

    async def thaw(self, name: str) -> None:
        """Thaw a frozen unit."""
        await self._manager("ThawUnit", "s", [name], unit=name)

    # -- watching --

    def watch(self, patterns: Iterable[str] = (), *, replay: bool = False) -> UnitWatch:
        """Unit state changes of the units matching any glob (all units if none).

        Use as ``async with sd.watch(["web*.service"]) as changes: async for c in changes``.
        With ``replay``, the current state of every matching loaded unit comes first,
        so a watcher that (re)connects never holds a stale picture.
        """
        return UnitWatch(self, tuple(patterns), replay)

    async def _subscribe(self) -> None:
        # Subscribe asks systemd to emit its signals even for units this client did
        # not start a job on; it lasts as long as this connection.
        if not self._subscribed:
            await self._manager("Subscribe")
            self._subscribed = True

    # -- D-Bus plumbing --

    def _on_message(self, msg: Message) -> None:
        if msg.message_type is not MessageType.SIGNAL:
            return
        if msg.member == "NameOwnerChanged" and msg.interface == DBUS:
            name, _old, new = msg.body
            if name == SYSTEMD:
                # systemd re-executed (daemon-reexec) or went away.
                self._owner = new or None
            return
        if msg.sender != self._owner:
            return
        if msg.member == "JobRemoved" and msg.path == MANAGER_PATH:
            _id, job, _unit, text = msg.body
            result = JobResult.parse(text)
            fut = self._waiters.get(job)
            if fut is not None:
                if not fut.done():
                    fut.set_result(result)
            elif self._inflight:
                # The signal of a job whose method reply this client has not read yet.
                self._early[job] = result
            return
        if msg.member == "PropertiesChanged" and msg.interface == PROPERTIES:
            name = unit_path_name(msg.path or "")
            if name is None or msg.body[0] != UNIT:
                return
            for watch in self._watches:
                watch.feed(name, msg.body[1])

    async def _add_match(self, **keys: str) -> None:
        await self._call(
            DBUS, "/org/freedesktop/DBus", DBUS, "AddMatch", "s", [_match_rule(**keys)]
        )

    async def _remove_match(self, **keys: str) -> None:
        if self._bus is not None and self._bus.connected:
            await self._call(
                DBUS, "/org/freedesktop/DBus", DBUS, "RemoveMatch", "s", [_match_rule(**keys)]
            )

    async def _get_all(self, path: str, interface: str, unit: str) -> dict[str, Variant]:
        (props,) = await self._call(
            SYSTEMD, path, PROPERTIES, "GetAll", "s", [interface], unit=unit
        )
        return dict(props)

    async def _manager(
        self, member: str, signature: str = "", body: list[Any] | None = None,
        unit: str | None = None,
    ) -> list[Any]:  # fmt: skip
        return await self._call(SYSTEMD, MANAGER_PATH, MANAGER, member, signature, body, unit)

    async def _call(
        self,
        destination: str,
        path: str,
        interface: str,
        member: str,
        signature: str = "",
        body: list[Any] | None = None,
        unit: str | None = None,
    ) -> list[Any]:
        """Call a method; translate D-Bus errors into SystemdError and its subclasses."""
        if self._bus is None or not self._bus.connected:
            raise SystemdError(f"not connected to systemd at {self._where}", unit=unit)
        msg = Message(
            destination=destination,
            path=path,
            interface=interface,
            member=member,
            signature=signature,
            body=body or [],
        )
        try:
            reply = await asyncio.wait_for(self._bus.call(msg), self.call_timeout)
        except TimeoutError as exc:
            raise SystemdTimeout(f"{member}: no reply after {self.call_timeout:g}s") from exc
        except (OSError, EOFError) as exc:
            raise SystemdError(f"{member}: connection to systemd lost: {exc}") from exc
        if reply.message_type is MessageType.ERROR:
            raise _translate(member, reply, unit)
        return list(reply.body)


class UnitWatch:
    """Unit state changes, as an async context manager and async iterator.

    Created by :meth:`SystemdManager.watch`. Each change carries the full (active,
    sub) state; PropertiesChanged signals that leave both as they were are dropped.
    """

    _RULE: ClassVar[dict[str, str]] = {
        "type": "signal",
        "sender": SYSTEMD,
        "interface": PROPERTIES,
        "member": "PropertiesChanged",
        "path_namespace": UNIT_PREFIX.rstrip("/"),
        "arg0": UNIT,
    }

    def __init__(self, manager: SystemdManager, patterns: tuple[str, ...], replay: bool) -> None:
        self._manager = manager
        self._patterns = patterns
        self._replay = replay
        # None ends the iteration; an error ends it by raising (the bus went away).
        self._queue: asyncio.Queue[UnitChange | SystemdError | None] = asyncio.Queue()
        self._known: dict[str, tuple[str, str]] = {}
        self._closed = False
        self._end: BaseException | None = None

    def _wanted(self, unit: str) -> bool:
        return not self._patterns or any(fnmatch.fnmatchcase(unit, p) for p in self._patterns)

    def feed(self, unit: str, changed: dict[str, Variant]) -> None:
        """Take one PropertiesChanged of a unit (called by the manager's handler)."""
        if self._closed or not self._wanted(unit):
            return
        before = self._known.get(unit)
        active = _value(changed, "ActiveState", before[0] if before else None)
        sub = _value(changed, "SubState", before[1] if before else None)
        if active is None or (active, sub) == before:
            return
        self._known[unit] = (active, sub or "")
        self._queue.put_nowait(UnitChange(unit, active, sub or "", before[0] if before else None))

    async def __aenter__(self) -> Self:
        await self._manager._subscribe()
        await self._manager._add_match(**self._RULE)
        self._manager._watches.add(self)
        if self._replay:
            for row in await self._manager.list_units():
                if self._wanted(row.unit) and row.unit not in self._known:
                    self._known[row.unit] = (row.active, row.sub)
                    self._queue.put_nowait(UnitChange(row.unit, row.active, row.sub, None))
            if self._patterns:
                # Units chosen by name or glob that systemd has not loaded (inactive ones
                # are unloaded): their state too, so a later start shows what it was.
                for file_row in await self._manager.list_unit_files():
                    unit = file_row.unit
                    if unit in self._known or not self._wanted(unit) or "@." in unit:
                        continue
                    status = await self._manager.unit_status(unit)
                    self._known[unit] = (status.active, status.sub)
                    self._queue.put_nowait(UnitChange(unit, status.active, status.sub, None))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        was_open = not self._closed
        self.close()
        if was_open:
            with contextlib.suppress(SystemdError):
                await self._manager._remove_match(**self._RULE)

    def close(self, error: SystemdError | None = None) -> None:
        """End the iteration; with ``error``, the iterator raises it after the queued changes."""
        if not self._closed:
            self._closed = True
            self._manager._watches.discard(self)
            self._queue.put_nowait(error)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> UnitChange:
        if self._end is not None:
            raise self._end
        change = await self._queue.get()
        if change is None or isinstance(change, SystemdError):
            # Every later call ends the same way instead of waiting forever.
            self._end = StopAsyncIteration() if change is None else change
            raise self._end
        return change

    async def next(self, timeout: float) -> UnitChange:
        """The next change, or SystemdTimeout after ``timeout`` seconds."""
        try:
            return await asyncio.wait_for(self.__anext__(), timeout)
        except TimeoutError as exc:
            raise SystemdTimeout(f"no unit change within {timeout:g}s") from exc


def _one(names: Sequence[str]) -> str | None:
    return names[0] if len(names) == 1 else None


def _changes(rows: list[list[str]]) -> tuple[UnitFileChange, ...]:
    return tuple(UnitFileChange(kind, path, source) for kind, path, source in rows)


_NOT_FOUND = frozenset(
    {
        "org.freedesktop.systemd1.NoSuchUnit",
        "org.freedesktop.DBus.Error.FileNotFound",
    }
)
_UNIT_IN_TEXT = re.compile(r"[Uu]nit(?: file)? ([^\s]+?)\.? (?:not found|does not exist)")


def _translate(member: str, reply: Message, unit: str | None) -> SystemdError:
    """The SystemdError for an error reply; NoSuchUnit names the unit."""
    name = reply.error_name or "unknown"
    text = str(reply.body[0]) if reply.body else name
    if name in _NOT_FOUND:
        found = _UNIT_IN_TEXT.search(text)
        return NoSuchUnit(unit or (found.group(1) if found else text), dbus_name=name)
    if name in (
        "org.freedesktop.DBus.Error.ServiceUnknown",
        "org.freedesktop.DBus.Error.NameHasNoOwner",
    ):
        return SystemdError(f"{member}: {text}", unit=unit, dbus_name=name)
    about = f" {unit}" if unit else ""
    if name == "org.freedesktop.DBus.Error.NotSupported":
        return NotSupported(f"{member}{about}: {text}", unit=unit, dbus_name=name)
    return SystemdError(f"{member}{about}: {text}", unit=unit, dbus_name=name)


__all__: list[str] = [
    "EnableResult",
    "JobResult",
    "NoSuchUnit",
    "NoSystemd",
    "NotSupported",
    "SystemdError",
    "SystemdManager",
    "SystemdTimeout",
    "UnitChange",
    "UnitFileChange",
    "UnitFileRow",
    "UnitRow",
    "UnitStatus",
    "UnitWatch",
]
