"""A component written for Directord runs unchanged: loaded from a file, parsed, run on a node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from directord import components
from directord.errors import ExecHelp, OrchestrationError
from directord.models import State
from tests.inprocess import InProcessCluster, run

# Written as Directord 0.12's docs and built-in components show: the verb is the file name.
GREET = """
from directord import components
from directord.components.lib import cacheargs, retry, timeout


class Component(components.ComponentBase):
    def __init__(self):
        super().__init__(desc="Greet someone")

    def args(self):
        super().args()
        self.parser.add_argument("--name", required=True, help="who to greet")
        self.parser.add_argument("--retry", default=1, type=int, help="attempts")

    def server(self, exec_array, data, arg_vars):
        super().server(exec_array=exec_array, data=data, arg_vars=arg_vars)
        data["name"] = self.known_args.name
        data["retry"] = self.known_args.retry
        data["command"] = " ".join(self.unknown_args)
        return data

    @timeout
    @cacheargs
    @retry
    def client(self, cache, job):
        success, text = self.blueprinter(
            content="hello {{ name }} from {{ home }}",
            values={**cache.get("args"), "name": job["name"]},
        )
        if not success:
            return None, text, False, None
        self.set_cache(cache, "args", {"greeted": job["name"]}, value_update=True)
        stdout, stderr, outcome = self.run_command(
            command=f"echo {text} && {job['command']}", env=cache.get("envs")
        )
        return stdout, stderr, outcome, None
"""


@pytest.fixture
def greet(tmp_path: Path) -> Iterator[None]:
    folder = tmp_path / "components"
    folder.mkdir(mode=0o755)
    (folder / "greet.py").write_text(GREET)
    (folder / "greet.py").chmod(0o644)
    components._registry()
    components._load_user_components(str(folder))
    try:
        yield
    finally:
        components._REGISTRY.pop("GREET", None)
        components._INSTANCES.pop("GREET", None)


def test_a_directord_component_runs_on_a_node(greet: None, tmp_path: Path) -> None:
    text = """- jobs:
    - ARG: home lab
    - GREET: --name world --stdout-arg said true
    - RUN: echo "{{ said }} / {{ greeted }}"
    - GREET: --name again false
"""

    async def scenario(c: InProcessCluster) -> None:
        parents, results = await c.run(text, targets=["node0"])
        _, ok, echo, bad = parents[0]["jobs"]
        assert results[ok]["node0"]["state"] == State.SUCCESS, results[ok]["node0"]["stderr"]
        assert results[ok]["node0"]["stdout"] == "hello world from lab\n"
        # --stdout-arg kept its output; what it wrote to the cache is there too.
        assert results[echo]["node0"]["stdout"] == "hello world from lab / world\n"
        assert results[bad]["node0"]["state"] == State.FAILED
        assert c.agents["node0"].cache.sections["args"]["greeted"] == "again"

    run(tmp_path, scenario, nodes=1)


def test_its_own_arguments_are_checked_and_its_help_shown(greet: None) -> None:
    with pytest.raises(ExecHelp) as info:
        components.build_job("GREET", "--exec-help", prepare=False)
    assert "--name" in info.value.text and "who to greet" in info.value.text
    with pytest.raises(OrchestrationError, match="the following arguments are required: --name"):
        components.build_job("GREET", "true", prepare=False)
    job = components.build_job("GREET", "--timeout 5 --name x true", prepare=False)
    assert job.timeout == 5.0 and job.options["job"]["name"] == "x"


def test_a_node_gets_only_the_component_file_of_its_own_job(greet: None, tmp_path: Path) -> None:
    async def scenario(c: InProcessCluster) -> None:
        parents, _ = await c.run("- jobs:\n    - GREET: --name x true\n", targets=["node0"])
        [job] = parents[0]["jobs"]
        with pytest.raises(OrchestrationError, match="no such job for this node"):
            await c.server.hooks.request("node1", "component", {"job": job})
        reply = await c.server.hooks.request("node0", "component", {"job": job})
        assert reply == {"data": GREET.encode()}

    run(tmp_path, scenario, nodes=2)


def test_an_oversized_component_file_is_never_loaded_nor_shipped(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "big"
    folder.mkdir(mode=0o755)
    big = folder / "bloat.py"
    big.write_text(GREET + "#" * components.MAX_COMPONENT_BYTES)
    big.chmod(0o644)
    components._registry()
    components._load_user_components(str(folder))
    assert "BLOAT" not in components.known_verbs()
    assert components.source_of("BLOAT") is None
    assert "over 1048576 bytes" in caplog.text
