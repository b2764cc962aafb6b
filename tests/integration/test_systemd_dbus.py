"""The systemd D-Bus client against a real systemd: PID 1 of a systemd-nspawn container.

One container is booted for the module (tests/nspawn.py); the host talks to its
systemd through the container's system bus socket, and reads effects back with
``systemctl`` inside. Each test uses its own units, so the order does not matter.
Also: a ``directord client`` runs as a unit of the container's systemd and joins a
server on the host.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

import pytest

from directord.agent.systemd import (
    JobResult,
    NoSuchUnit,
    NoSystemd,
    NotSupported,
    SystemdError,
    SystemdManager,
    SystemdTimeout,
    UnitChange,
    UnitFileRow,
    UnitRow,
    UnitStatus,
    UnitWatch,
    unit_path_name,
)
from directord.localcluster import LocalCluster
from tests import nspawn

T = TypeVar("T")


@pytest.fixture(autouse=True, scope="module")
def _containers_can_run() -> None:
    """No silent skip: a machine that cannot boot the containers fails, saying why."""
    problem = nspawn.unavailable()
    if problem is not None:
        pytest.fail(f"systemd-nspawn containers cannot run here: {problem}")


UNIT_DIR = "/etc/systemd/system"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nspawn.Container]:
    with nspawn.boot(1, tmp_path_factory.mktemp("nspawn")) as (container,):
        yield container


def sd(node: nspawn.Container, fn: Callable[[SystemdManager], Awaitable[T]]) -> T:
    """Run ``fn`` with a manager connected to the container's systemd, in a fresh loop."""

    async def main() -> T:
        async with SystemdManager(node.bus_address, job_timeout=30.0) as manager:
            return await fn(manager)

    return asyncio.run(main())


def units(node: nspawn.Container, **files: str) -> dict[str, str]:
    """Install unit files (``{stem: body}``) under unique names; daemon-reload; return names."""
    tag = uuid.uuid4().hex[:6]
    names = {}
    for stem, body in files.items():
        name = f"dd-{stem}-{tag}.service"
        node.write_file(f"{UNIT_DIR}/{name}", body.replace("{tag}", tag))
        names[stem] = name
    node.systemctl("daemon-reload")
    return names


SLEEP = """\
[Unit]
Description=directord test sleeper
[Service]
ExecStart=/bin/sleep infinity
ExecReload=/bin/true
[Install]
WantedBy=multi-user.target
"""
FAILS = """\
[Service]
Type=oneshot
ExecStart=/bin/false
"""


def show(node: nspawn.Container, unit: str, prop: str) -> str:
    return node.systemctl("show", "-P", prop, unit).strip()


# ---- connecting -------------------------------------------------------------------------------


def test_no_bus_is_no_systemd(tmp_path: Path) -> None:
    address = f"unix:path={tmp_path}/absent.sock"
    with pytest.raises(NoSystemd, match="no systemd") as err:
        asyncio.run(SystemdManager(address).connect())
    assert err.value.address == address


def test_bus_without_systemd_is_no_systemd(node: nspawn.Container) -> None:
    # A D-Bus daemon of its own inside the container: a bus on which systemd is absent.
    unit = f"dd-bus-{uuid.uuid4().hex[:6]}"
    sock = f"/run/{unit}.sock"
    node.start_unit(unit, ["dbus-daemon", "--session", "--nofork", f"--address=unix:path={sock}"])
    try:
        deadline = time.monotonic() + 10
        while not node.path(sock).exists():
            assert time.monotonic() < deadline, node.journal(unit)
            time.sleep(0.05)
        with pytest.raises(NoSystemd, match=r"org\.freedesktop\.systemd1 is not on the bus"):
            asyncio.run(SystemdManager(f"unix:path={node.path(sock)}").connect())
    finally:
        node.systemctl("stop", unit, check=False)


# ---- queries ---------------------------------------------------------------------------------


def test_list_units(node: nspawn.Container) -> None:
    rows = sd(node, lambda m: m.list_units())
    assert all(isinstance(r, UnitRow) for r in rows)
    by_name = {r.unit: r for r in rows}
    dbus = by_name["dbus.service"]
    assert (dbus.load, dbus.active, dbus.sub) == ("loaded", "active", "running")
    assert dbus.description
    assert by_name["multi-user.target"].active == "active"
    # The same set systemctl lists (every loaded unit).
    listed = json.loads(node.systemctl("list-units", "--all", "--output=json"))
    assert {u["unit"] for u in listed} <= set(by_name)


def test_list_unit_files_and_enable_disable(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]

    async def scenario(m: SystemdManager) -> None:
        files = {r.unit: r.state for r in await m.list_unit_files()}
        assert all(isinstance(r, UnitFileRow) for r in await m.list_unit_files())
        assert files[name] == "disabled"
        assert files["dbus.service"] == "static"

        enabled = await m.enable([name])
        assert enabled.carries_install_info
        assert [c.kind for c in enabled.changes] == ["symlink"]
        assert enabled.changes[0].path.endswith(f"multi-user.target.wants/{name}")
        assert enabled.jobs == {}
        assert {r.unit: r.state for r in await m.list_unit_files()}[name] == "enabled"
        assert node.systemctl("is-enabled", name).strip() == "enabled"
        assert node.systemctl("is-active", name, check=False).strip() == "inactive"

        disabled = await m.disable([name])
        assert [c.kind for c in disabled.changes] == ["unlink"]
        assert {r.unit: r.state for r in await m.list_unit_files()}[name] == "disabled"

        # --now: enabled and started, then disabled and stopped.
        assert (await m.enable([name], now=True)).jobs == {name: JobResult.DONE}
        assert node.systemctl("is-active", name).strip() == "active"
        assert (await m.disable([name], now=True)).jobs == {name: JobResult.DONE}
        assert node.systemctl("is-active", name, check=False).strip() == "inactive"
        assert node.systemctl("is-enabled", name, check=False).strip() == "disabled"

    sd(node, scenario)


# ---- jobs ------------------------------------------------------------------------------------


def test_start_status_stop(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]

    async def scenario(m: SystemdManager) -> tuple[UnitStatus, UnitStatus]:
        assert await m.start(name) == "done"
        running = await m.unit_status(name)
        assert await m.stop(name) == JobResult.DONE
        return running, await m.unit_status(name)

    before = datetime.now(UTC)
    running, stopped = sd(node, scenario)
    assert (running.load, running.active, running.sub) == ("loaded", "active", "running")
    assert running.description == "directord test sleeper"
    assert running.unit_file_state == "disabled"
    assert running.result == "success"
    assert running.main_pid is not None and running.main_pid > 1
    assert running.since is not None
    assert before - timedelta(seconds=5) < running.since < datetime.now(UTC)
    # The main pid is the pid in the container's namespace, as systemctl shows it.
    assert show(node, name, "MainPID") == "0"  # stopped now
    assert (stopped.active, stopped.sub, stopped.main_pid) == ("inactive", "dead", None)


def test_status_main_pid_matches_systemctl(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]
    assert sd(node, lambda m: m.start(name)) == JobResult.DONE
    try:
        status = sd(node, lambda m: m.unit_status(name))
        assert str(status.main_pid) == show(node, name, "MainPID")
        cmdline = node.run("cat", f"/proc/{status.main_pid}/cmdline").stdout
        assert cmdline.split("\0")[:2] == ["/bin/sleep", "infinity"]
    finally:
        node.systemctl("stop", name)


def test_restart_and_reload(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]

    async def scenario(m: SystemdManager) -> None:
        assert await m.start(name) == JobResult.DONE
        first = (await m.unit_status(name)).main_pid
        assert await m.restart(name) == JobResult.DONE
        second = (await m.unit_status(name)).main_pid
        assert first and second and first != second
        assert await m.reload(name) == JobResult.DONE
        assert (await m.unit_status(name)).main_pid == second
        assert await m.stop(name) == JobResult.DONE

    sd(node, scenario)


def test_failing_start_and_reset_failed(node: nspawn.Container) -> None:
    names = units(node, fails=FAILS, other=FAILS)
    fails, other = names["fails"], names["other"]

    async def scenario(m: SystemdManager) -> None:
        assert await m.start(fails) == JobResult.FAILED
        status = await m.unit_status(fails)
        assert (status.active, status.sub, status.result) == ("failed", "failed", "exit-code")
        assert node.systemctl("is-failed", fails).strip() == "failed"
        await m.reset_failed(fails)
        assert (await m.unit_status(fails)).active == "inactive"

        # reset_failed() with no unit resets every failed unit.
        assert await m.start(fails) == "failed"
        assert await m.start(other) == "failed"
        await m.reset_failed()
        for name in (fails, other):
            assert node.systemctl("is-failed", name, check=False).strip() == "inactive"

    sd(node, scenario)


def test_dependency_failure(node: nspawn.Container) -> None:
    names = units(node, fails=FAILS)
    dep = units(
        node,
        dep=f"[Unit]\nRequires={names['fails']}\nAfter={names['fails']}\n"
        "[Service]\nExecStart=/bin/sleep infinity\n",
    )["dep"]
    assert sd(node, lambda m: m.start(dep)) == JobResult.DEPENDENCY
    assert node.systemctl("is-active", dep, check=False).strip() == "inactive"
    node.systemctl("reset-failed")


def test_wait_longer_than_timeout_raises(node: nspawn.Container) -> None:
    slow = units(node, slow="[Service]\nType=oneshot\nExecStart=/bin/sleep 3\n")["slow"]
    with pytest.raises(SystemdTimeout, match=slow):
        sd(node, lambda m: m.start(slow, timeout=0.3))
    # The job went on in systemd; a second start waits for the same job to finish.
    assert sd(node, lambda m: m.start(slow, timeout=10)) == JobResult.DONE


def test_kill(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]

    async def scenario(m: SystemdManager) -> UnitStatus:
        assert await m.start(name) == JobResult.DONE
        async with m.watch([name]) as changes:
            await m.kill(name, "main", 9)
            while (await changes.next(10)).active not in ("failed", "inactive"):
                pass
        return await m.unit_status(name)

    status = sd(node, scenario)
    assert (status.active, status.result) == ("failed", "signal")
    with pytest.raises(ValueError, match="whom"):
        sd(node, lambda m: m.kill(name, "everyone", 9))
    node.systemctl("reset-failed", name)


def test_freeze_and_thaw(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]
    assert sd(node, lambda m: m.start(name)) == JobResult.DONE
    try:

        async def scenario(m: SystemdManager) -> tuple[str, str] | NotSupported:
            try:
                await m.freeze(name)
            except NotSupported as exc:
                return exc
            frozen = (await m.unit_status(name)).freezer_state
            await m.thaw(name)
            return frozen, (await m.unit_status(name)).freezer_state

        outcome = sd(node, scenario)
        if isinstance(outcome, NotSupported):
            # A cgroup v1 (hybrid) host: systemd's freezer needs the unified hierarchy.
            assert outcome.unit == name
            assert name in str(outcome)
            assert outcome.dbus_name == "org.freedesktop.DBus.Error.NotSupported"
        else:
            assert outcome == ("frozen", "running")
    finally:
        node.systemctl("stop", name)


# ---- missing units ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call",
    [
        "unit_status",
        "start",
        "stop",
        "restart",
        "reload",
        "kill",
        "reset_failed",
        "freeze",
        "enable",
        "disable",
    ],
)
def test_missing_unit_raises_no_such_unit(node: nspawn.Container, call: str) -> None:
    missing = f"dd-missing-{uuid.uuid4().hex[:6]}.service"

    async def scenario(m: SystemdManager) -> object:
        if call in ("enable", "disable"):
            return await getattr(m, call)([missing])
        return await getattr(m, call)(missing)

    with pytest.raises(NoSuchUnit) as err:
        sd(node, scenario)
    assert err.value.unit == missing
    assert missing in str(err.value)
    assert isinstance(err.value, SystemdError)


# ---- watching --------------------------------------------------------------------------------


def test_watch_yields_state_changes(node: nspawn.Container) -> None:
    name = units(node, sleep=SLEEP)["sleep"]

    async def until(changes: UnitWatch, active: str, seen: list[UnitChange]) -> None:
        while True:
            change: UnitChange = await changes.next(10)
            seen.append(change)
            if change.active == active:
                return

    async def scenario(m: SystemdManager) -> tuple[list[UnitChange], list[UnitChange]]:
        started: list[UnitChange] = []
        stopped: list[UnitChange] = []
        async with m.watch([name, "dd-nothing-*.service"]) as changes:
            assert await m.start(name) == JobResult.DONE
            await until(changes, "active", started)
            assert await m.stop(name) == JobResult.DONE
            await until(changes, "inactive", stopped)
        return started, stopped

    started, stopped = sd(node, scenario)
    assert {c.unit for c in started + stopped} == {name}
    assert started[-1] == UnitChange(name, "active", "running", started[-1].previous)
    assert stopped[-1].active == "inactive" and stopped[-1].sub == "dead"
    # The active -> inactive change, through deactivating when systemd reports it.
    assert stopped[-1].previous in ("active", "deactivating")
    assert stopped[0].previous == "active"


def test_watch_replays_current_state_first(node: nspawn.Container) -> None:
    async def scenario(m: SystemdManager) -> UnitChange:
        async with m.watch(["dbus.service"], replay=True) as changes:
            return await changes.next(5)

    first = sd(node, scenario)
    assert first == UnitChange("dbus.service", "active", "running", None)


def test_watch_fails_when_the_node_goes_away(tmp_path: Path) -> None:
    # A node of its own: this test powers it off while a watch is open.
    with nspawn.boot(1, tmp_path) as (gone,):

        async def scenario() -> SystemdError:
            async with (
                SystemdManager(gone.bus_address) as m,
                m.watch(["*.service"], replay=True) as changes,
            ):
                await changes.next(5)
                stopping = asyncio.create_task(asyncio.to_thread(gone.stop))
                try:
                    # Services stop one by one, then the bus goes with dbus.service.
                    async with asyncio.timeout(30):
                        async for _ in changes:
                            pass
                except SystemdError as exc:
                    error = exc
                else:
                    raise AssertionError("the watch ended without an error")
                await stopping
                with pytest.raises(SystemdError):
                    await changes.next(1)
                return error

        error = asyncio.run(scenario())
    assert "lost the connection to systemd" in str(error)


def test_unit_path_names() -> None:
    assert unit_path_name("/org/freedesktop/systemd1/unit/dbus_2eservice") == "dbus.service"
    assert (
        unit_path_name("/org/freedesktop/systemd1/unit/getty_40tty1_2eservice")
        == "getty@tty1.service"
    )
    assert unit_path_name("/org/freedesktop/systemd1") is None


# ---- a directord client as a unit of the container's systemd ---------------------------------


def test_client_runs_as_a_unit_and_joins_the_host_server(
    node: nspawn.Container, tmp_path: Path
) -> None:
    cluster = LocalCluster(tmp_path / "cluster", nodes=0, heartbeat=1.0)
    cluster.start()
    unit = f"directord-client-{uuid.uuid4().hex[:6]}"
    identity = f"ct-{node.name}"
    try:
        node.write_file("/etc/directord/config.yaml", "{}\n")
        ready = f"/run/{unit}.ready"
        node.start_unit(
            unit,
            [
                sys.executable,
                "-m",
                "directord",
                "--config-file",
                "/etc/directord/config.yaml",
                "--heartbeat-interval",
                "1",
                "--identity",
                identity,
                "--cache-path",
                f"/var/cache/{unit}",
                "--run-path",
                f"/run/{unit}",
                "--grpc-server-address",
                "127.0.0.1",
                "--grpc-port",
                str(cluster.port),
                "--ready-file",
                ready,
                "client",
            ],
        )
        deadline = time.monotonic() + 30
        while not node.path(ready).exists():
            assert time.monotonic() < deadline, node.journal(unit)
            time.sleep(0.1)
        assert node.systemctl("is-active", unit).strip() == "active"

        listed = json.loads(cluster.cli("manage", "--list-nodes", "--format", "json").stdout)
        row = next(n for n in listed if n["identity"] == identity)
        assert row["status"] == "online"
        # The node reports the container's own machine id (from its --uuid).
        assert node.run("cat", "/etc/machine-id").stdout.strip() == node.uuid.hex

        # A job runs inside the container: its hostname is the container's.
        proc = cluster.cli(
            "exec", "--verb", "RUN", "--skip-cache hostname", "--target", identity,
            "--wait", "--format", "json",
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        [result] = json.loads(proc.stdout)["results"]
        assert (result["state"], result["stdout"].strip()) == ("success", node.name)

        # The client's unit, seen through the D-Bus client.
        status = sd(node, lambda m: m.unit_status(f"{unit}.service"))
        assert (status.active, status.sub) == ("active", "running")
        assert status.main_pid is not None
    finally:
        node.systemctl("stop", unit, check=False)
        cluster.stop()
