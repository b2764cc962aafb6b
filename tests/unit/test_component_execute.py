"""Each component's ``execute()`` against a fake execution context, driven by a table.

The context is a fake of ``components.base.ExecContext``: the cache is plain
dicts, shells answer from a script of (command -> result), server requests
from a table, and a restart or a QUERY exchange is recorded. Templates render
for real. A row gives the verb and its argument string, the node's state
before, and what must come out: the job's state and output, and the cache
after.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from directord.agent.templates import render_template
from directord.components import get_component
from directord.components.base import ProcessResult
from directord.models import FileRef, State


@dataclass
class FakeContext:
    """What a component may do on a node, with nothing behind it but dicts."""

    identity: str = "node0"
    args: dict[str, Any] = field(default_factory=dict)
    envs: dict[str, str] = field(default_factory=dict)
    query: dict[str, Any] = field(default_factory=dict)
    job_id: str = "j1"
    timeout: float = 600.0
    vars: dict[str, Any] = field(default_factory=dict)
    files: list[FileRef] = field(default_factory=list)
    shell: dict[str, ProcessResult] = field(default_factory=dict)
    answers: dict[str, Any] = field(default_factory=dict)
    ran: list[str] = field(default_factory=list)
    evicted: list[str] = field(default_factory=list)
    reported: list[Any] = field(default_factory=list)
    restart: bool = False

    def render(self, text: str) -> str:
        return render_template(
            text, {"identity": self.identity, **self.args, **self.vars}, query=self.query
        )

    def update_cache(self, section: str, values: Mapping[str, Any]) -> None:
        getattr(self, section).update(values)

    def evict_cache(self, section: str) -> None:
        self.evicted.append(section)

    async def run_shell(
        self,
        command: str,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float | None = None,
        block: bool = True,
        durable: bool = False,
    ) -> ProcessResult:
        self.ran.append(command)
        return self.shell.get(command, ProcessResult(127, "", f"sh: {command}: not found"))

    def cancel_waiting(self) -> int:
        self.evicted.append("waiting")
        return 2

    async def fetch_file(
        self, index: int, dest: str, expected_sha256: str, size: int, **_: Any
    ) -> None:
        Path(dest).write_bytes(self.answers["file"])

    async def fetch_bytes(self, index: int, limit: int) -> bytes:
        data: bytes = self.answers["file"]
        return data

    async def request(self, method: str, params: dict[str, Any]) -> Any:
        return self.answers[method]

    async def query_exchange(self, value: Any, wait: bool) -> dict[str, Any] | None:
        self.reported.append(value)
        return self.answers.get("query") if wait else None

    def request_restart(self) -> None:
        self.restart = True


OK = ProcessResult(0, "out\n", "")


@dataclass
class Row:
    verb: str
    args: str
    before: dict[str, Any] = field(default_factory=dict)
    state: State = State.SUCCESS
    stdout: str | None = None
    stderr_has: str = ""
    after: dict[str, Any] = field(default_factory=dict)


ROWS = [
    Row("ECHO", "hello {{ who }}", {"args": {"who": "web"}}, stdout="hello web"),
    Row("ECHO", "{{ missing }}", state=State.FAILED, stderr_has="'missing' is undefined"),
    Row("RUN", "echo hi", {"shell": {"echo hi": OK}}, stdout="out\n", after={"ran": ["echo hi"]}),
    Row(
        "RUN",
        "exit 3",
        {"shell": {"exit 3": ProcessResult(3, "", "bad\n")}},
        state=State.FAILED,
        stderr_has="bad",
    ),
    Row(
        "RUN",
        "--retry 2 flaky",
        {"shell": {"flaky": ProcessResult(1, "", "no")}},
        state=State.FAILED,
        after={"ran": ["flaky", "flaky", "flaky"]},
    ),
    Row(
        "RUN",
        "sleep 9",
        {"shell": {"sleep 9": ProcessResult(None, "", "", timed_out=True)}},
        state=State.TIMEOUT,
        stderr_has="killed",
    ),
    Row(
        "RUN",
        "echo {{ query['web2']['v'] }}",
        {"query": {"web2": {"v": "$(reboot)"}}},
        state=State.FAILED,
        stderr_has="untrusted value from node 'web2', query key 'v'",
        after={"ran": []},
    ),
    Row("ARG", "color teal", stdout="teal", after={"args": {"color": "teal"}}),
    Row("ARG", "sizes [1, 2]", stdout="[1, 2]", after={"args": {"sizes": [1, 2]}}),
    Row(
        "ARG",
        "--extend-args sizes [2, 3]",
        {"args": {"sizes": [1, 2]}},
        after={"args": {"sizes": [1, 2, 3]}},
    ),
    Row("ENV", "PORT 8080", stdout="8080", after={"envs": {"PORT": "8080"}}),
    Row("CACHEEVICT", "args", after={"evicted": ["args"]}),
    Row("RESTART", "", stdout="client restarting", after={"restart": True}),
    Row("QUEUESENTINEL", "", stdout="cancelled 2 waiting jobs", after={"evicted": ["waiting"]}),
    Row("QUERY", "--no-wait role", {"args": {"role": "db"}}, after={"reported": ["db"]}),
    Row(
        "QUERY_WAIT",
        "--query-timeout 0.05 role",
        state=State.FAILED,
        stderr_has="role not in the query cache",
    ),
    Row("QUERY_WAIT", "role", {"query": {"n1": {"role": "db"}}}, stdout="role present"),
    Row(
        "JOB_WAIT",
        "--identity n1 " + "a" * 56,
        {"answers": {"job_status": {"n1": "failed"}}},
        state=State.FAILED,
        stderr_has="n1 (failed)",
    ),
    Row(
        "JOB_WAIT",
        "--identity n1 " + "a" * 56,
        {"answers": {"job_status": {"n1": "success"}}},
        stdout=f"job {'a' * 12} ended on n1",
    ),
    Row("WAIT", "--seconds 0", stdout=""),
    Row(
        "WAIT",
        "--retry 2 --retry-wait 0 --cmd probe",
        {"shell": {"probe": ProcessResult(1, "", "down")}},
        state=State.FAILED,
        stderr_has="WAIT gave up after 2 attempts",
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: f"{r.verb}:{r.args[:30]}")
def test_execute(row: Row) -> None:
    ctx = FakeContext(**row.before)
    component = get_component(row.verb)
    options = component.parse(row.args)
    try:
        outcome = asyncio.run(component.execute(options, ctx))  # type: ignore[arg-type]
    except Exception as exc:  # the agent turns a DirectordError into a failed job
        from directord.errors import DirectordError

        assert isinstance(exc, DirectordError), exc
        outcome_state, stdout, stderr = State.FAILED, "", str(exc)
    else:
        outcome_state, stdout, stderr = outcome.state, outcome.stdout, outcome.stderr
    assert outcome_state is row.state, (stdout, stderr)
    if row.stdout is not None:
        assert stdout == row.stdout
    assert row.stderr_has in stderr
    for name, expected in row.after.items():
        got = getattr(ctx, name)
        assert got == (
            {**row.before.get(name, {}), **expected} if isinstance(expected, dict) else expected
        )


def test_copy_writes_the_fetched_file_with_its_mode(tmp_path: Path) -> None:
    data = b"content\n"
    import hashlib

    ref = FileRef("site.conf", len(data), hashlib.sha256(data).hexdigest())
    ctx = FakeContext(files=[ref], answers={"file": data})
    component = get_component("COPY")
    options = component.parse(f"--chmod 0640 site.conf {tmp_path}/")
    outcome = asyncio.run(component.execute(options, ctx))  # type: ignore[arg-type]
    assert outcome.state is State.SUCCESS, outcome.stderr
    assert (tmp_path / "site.conf").read_bytes() == data
    again = asyncio.run(component.execute(options, ctx))  # type: ignore[arg-type]
    assert again.stdout == f"unchanged {tmp_path}/site.conf"


def test_copy_blueprint_renders_with_the_nodes_args(tmp_path: Path) -> None:
    import hashlib

    template = b"port {{ port }} on {{ identity }}\n"
    ref = FileRef("app.conf", len(template), hashlib.sha256(template).hexdigest())
    ctx = FakeContext(args={"port": 80}, files=[ref], answers={"file": template})
    component = get_component("COPY")
    options = component.parse(f"--blueprint app.conf {tmp_path}/app.conf")
    assert asyncio.run(component.execute(options, ctx)).state is State.SUCCESS  # type: ignore[arg-type]
    assert (tmp_path / "app.conf").read_text() == "port 80 on node0\n"


def test_cachefile_loads_a_mapping_into_args(tmp_path: Path) -> None:
    (tmp_path / "facts.yaml").write_text("release: 2\nowner: ops\n")
    ctx = FakeContext()
    component = get_component("CACHEFILE")
    outcome = asyncio.run(component.execute(component.parse(f"{tmp_path}/facts.yaml"), ctx))  # type: ignore[arg-type]
    assert outcome.state is State.SUCCESS and ctx.args == {"release": 2, "owner": "ops"}
    (tmp_path / "list.yaml").write_text("- a\n")
    bad = asyncio.run(component.execute(component.parse(f"{tmp_path}/list.yaml"), ctx))  # type: ignore[arg-type]
    assert bad.state is State.FAILED and "expected a mapping" in bad.stderr


def test_workdir_makes_the_directory(tmp_path: Path) -> None:
    ctx = FakeContext(args={"base": str(tmp_path)})
    component = get_component("WORKDIR")
    outcome = asyncio.run(component.execute(component.parse("--chmod 0750 {{ base }}/a/b"), ctx))  # type: ignore[arg-type]
    assert outcome.state is State.SUCCESS
    assert (tmp_path / "a" / "b").stat().st_mode & 0o777 == 0o750
