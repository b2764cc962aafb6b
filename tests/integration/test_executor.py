"""The node's executor with real /bin/sh processes: capture, exit codes, timeouts, groups."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from directord.agent import executor
from directord.agent.executor import encoded_environment, run_shell, spawn_detached

T = TypeVar("T")
DEADLINE = 30.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


def alive_in_group(pgid: int) -> list[int]:
    """Pids of processes in a process group that are not zombies."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            pids.append(int(entry))
    return pids


def is_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


async def wait_until_gone(pids: list[int]) -> list[int]:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while loop.time() < end:
        left = [p for p in pids if is_alive(p)]
        if not left:
            return []
        await asyncio.sleep(0.05)
    return [p for p in pids if is_alive(p)]


async def wait_for_file(path: Path) -> str:
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    while loop.time() < end:
        if path.exists() and path.read_text().endswith("\n"):
            return path.read_text()
        await asyncio.sleep(0.02)
    raise AssertionError(f"{path} never written")


def test_captures_stdout_stderr_and_rc() -> None:
    result = run(run_shell("echo out; echo err >&2; printf 'no newline'; exit 0"))
    assert result.rc == 0 and result.timed_out is False
    assert result.stdout == "out\nno newline"
    assert result.stderr == "err\n"


@pytest.mark.parametrize("code", [1, 3, 127, 255])
def test_exit_codes(code: int) -> None:
    assert run(run_shell(f"exit {code}")).rc == code


def test_missing_command_is_127_with_a_message() -> None:
    result = run(run_shell("definitely-not-a-command-xyz"))
    assert result.rc == 127
    assert "not found" in result.stderr


def test_killed_by_a_signal_is_a_negative_rc() -> None:
    result = run(run_shell("kill -TERM $$"))
    assert result.rc == -signal.SIGTERM and result.timed_out is False


def test_shell_syntax_reaches_sh_verbatim() -> None:
    result = run(run_shell("for i in 1 2 3; do echo \"n=$i\"; done | tr '\\n' ' ' && echo"))
    assert result.stdout == "n=1 n=2 n=3 \n"


def test_stdin_is_empty() -> None:
    result = run(run_shell("cat; echo end"))
    assert result.stdout == "end\n"


def test_output_is_decoded_with_replacement() -> None:
    result = run(run_shell("printf 'caf\\303\\251 \\377\\n'"))
    assert result.stdout == "café \ufffd\n"


def test_large_output_is_captured_whole() -> None:
    result = run(run_shell("head -c 3000000 /dev/zero | tr '\\0' x; echo done >&2"))
    assert result.rc == 0
    assert len(result.stdout) == 3_000_000 and set(result.stdout) == {"x"}
    assert result.stderr == "done\n"


def test_output_cap_keeps_the_head(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(executor, "MAX_CAPTURE", 1000)
    result = run(run_shell("seq 1 5000; seq 1 5000 >&2"))
    assert result.rc == 0
    expected_head = "".join(f"{i}\n" for i in range(1, 5001))[:1000]
    assert result.stdout == expected_head
    assert result.stderr == expected_head


def test_env_is_passed() -> None:
    env = encoded_environment({"DIRECTORD_TEST_VAR": "välue with spaces"})
    result = run(run_shell('printf %s "$DIRECTORD_TEST_VAR"', env))
    assert result.stdout == "välue with spaces"
    only = {b"ONLY": b"this", b"PATH": os.environb.get(b"PATH", b"/usr/bin:/bin")}
    result = run(run_shell('echo "$ONLY ${HOME:-unset}"', only))
    assert result.stdout == "this unset\n"


def test_default_env_is_the_agents() -> None:
    result = run(run_shell('echo "$PATH"'))
    assert result.stdout.strip() == os.environ["PATH"]


def test_encoded_environment_merges_extra() -> None:
    env = encoded_environment({"A_B": "1"})
    assert env[b"A_B"] == b"1"
    assert all(env[k] == v for k, v in os.environb.items() if k != b"A_B")
    assert b"A_B" not in encoded_environment()


def test_streaming_callback_receives_lines() -> None:
    lines: list[tuple[str, str]] = []
    result = run(
        run_shell(
            "echo a; echo err1 >&2; printf 'b\\nc\\n'; echo err2 >&2; printf 'tail'",
            on_output=lambda s, d: lines.append((s, d)),
        )
    )
    assert [d for s, d in lines if s == "stdout"] == ["a", "b", "c", "tail"]
    assert [d for s, d in lines if s == "stderr"] == ["err1", "err2"]
    assert result.stdout == "a\nb\nc\ntail"  # captured as well as streamed


def test_streaming_sees_lines_before_the_process_ends(tmp_path: Path) -> None:
    gate = tmp_path / "gate"

    async def go() -> list[str]:
        seen: list[str] = []
        task = asyncio.create_task(
            run_shell(
                f"echo first; while [ ! -e {gate} ]; do sleep 0.02; done; echo second",
                on_output=lambda s, d: seen.append(d),
            )
        )
        loop = asyncio.get_running_loop()
        end = loop.time() + DEADLINE
        while "first" not in seen and loop.time() < end:
            await asyncio.sleep(0.02)
        assert seen == ["first"] and not task.done()
        gate.write_text("")
        await task
        return seen

    assert run(go()) == ["first", "second"]


def test_timeout_kills_the_whole_group_including_background_grandchild(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def go() -> None:
        result = await run_shell(
            f'sleep 300 & echo "$$ $!" > {pids}; echo started; wait', timeout=0.5
        )
        assert result.timed_out is True and result.rc is None
        assert result.stdout == "started\n"
        shell, grandchild = (int(p) for p in pids.read_text().split())
        assert await wait_until_gone([shell, grandchild]) == []
        assert alive_in_group(shell) == []

    run(go())


def test_timeout_kills_a_double_forked_daemon_in_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def go() -> None:
        # The subshell exits at once, so the sleep is reparented away from the shell,
        # yet it stays in the job's process group and dies with it.
        result = await run_shell(
            f"(sleep 300 >/dev/null 2>&1 & echo $! > {pids}); sleep 300", timeout=0.5
        )
        assert result.timed_out is True
        (daemon,) = (int(p) for p in (await wait_for_file(pids)).split())
        assert await wait_until_gone([daemon]) == []

    run(go())


def test_cancellation_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def go() -> None:
        task = asyncio.create_task(run_shell(f'sleep 300 & echo "$$ $!" > {pids}; wait'))
        shell, grandchild = (int(p) for p in (await wait_for_file(pids)).split())
        assert is_alive(shell) and is_alive(grandchild)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await wait_until_gone([shell, grandchild]) == []
        assert alive_in_group(shell) == []

    run(go())


def test_background_child_holding_the_pipes_does_not_block_the_result(tmp_path: Path) -> None:
    pids = tmp_path / "pids"

    async def go() -> None:
        # The shell exits; its background child keeps stdout open. The job still
        # finishes (after a short grace), with the output written so far.
        result = await run_shell(f"sleep 300 & echo $! > {pids}; echo done")
        assert result.rc == 0 and result.timed_out is False
        assert result.stdout == "done\n"
        grandchild = int(pids.read_text())
        try:
            assert is_alive(grandchild)  # not a timeout: nothing was killed
        finally:
            os.kill(grandchild, signal.SIGKILL)
        assert await wait_until_gone([grandchild]) == []

    run(go())


def test_many_concurrent_jobs() -> None:
    async def go() -> None:
        results = await asyncio.gather(*(run_shell(f"echo {i}; exit {i % 4}") for i in range(40)))
        assert [r.stdout for r in results] == [f"{i}\n" for i in range(40)]
        assert [r.rc for r in results] == [i % 4 for i in range(40)]

    run(go())


def test_spawn_detached_runs_in_its_own_session(tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    gate = tmp_path / "gate"

    async def go() -> None:
        pid = await spawn_detached(
            f"echo $$ > {marker}; while [ ! -e {gate} ]; do sleep 0.02; done"
        )
        assert int(await wait_for_file(marker)) == pid
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        assert int(fields[2]) == pid and int(fields[3]) == pid  # own group, own session
        gate.write_text("")
        assert await wait_until_gone([pid]) == []

    run(go())


def test_jobs_get_umask_022_whatever_the_agents_own(tmp_path: Path) -> None:
    # The client unit runs the agent with UMask=0077 (its cache holds secrets); what a
    # job creates must still be what a root shell would create.
    old = os.umask(0o077)
    try:
        result = run(run_shell(f"umask; touch {tmp_path}/f; mkdir {tmp_path}/d"))
    finally:
        os.umask(old)
    assert result.stdout.strip() == "0022"
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


def test_error_line_numbers_are_the_commands_own() -> None:
    result = run(run_shell("true\nfi"))
    assert result.rc != 0 and ": 2: " in result.stderr, result.stderr
