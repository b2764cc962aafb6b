"""Users' components live on the server only: it ships each file to the nodes that run it."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable

from tests.conftest import Cluster
from tests.e2e.helpers import read_lines

SHOUT = """
from directord.components.base import Component, Outcome


class Shout(Component):
    verb = "SHOUT"
    summary = "Print the argument in capitals."

    async def execute(self, options, ctx):
        return Outcome.ok(" ".join(options["argv"]).upper() + " from " + ctx.identity)
"""

# Written for Directord: the verb is the file's name.
GREET = """
from directord import components


class Component(components.ComponentBase):
    def args(self):
        super().args()
        self.parser.add_argument("--name", required=True)

    def server(self, exec_array, data, arg_vars):
        super().server(exec_array=exec_array, data=data, arg_vars=arg_vars)
        data["name"] = self.known_args.name
        return data

    def client(self, cache, job):
        return "hello " + job["name"], None, True, None
"""


def test_the_server_ships_component_files_to_the_nodes(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=2, start=False)
    folder = cluster.root / "components"
    folder.mkdir(mode=0o755)
    for name, text in (("shout.py", SHOUT), ("greet.py", GREET)):
        (folder / name).write_text(text)
        (folder / name).chmod(0o644)
    # One config file for the server, the CLI and the clients; the clients do not
    # read the directory (no --local-components): they run what the server ships.
    cluster.config.write_text(f"components_path: {folder}\n")
    cluster.start()
    reply = cluster.orchestrate("- jobs:\n    - SHOUT: hi there\n    - GREET: --name you\n")
    outputs = sorted((r["node"], r["verb"], r["state"], r["stdout"]) for r in reply["results"])
    assert outputs == [
        ("node0", "GREET", "success", "hello you"),
        ("node0", "SHOUT", "success", "HI THERE from node0"),
        ("node1", "GREET", "success", "hello you"),
        ("node1", "SHOUT", "success", "HI THERE from node1"),
    ]
    for node in cluster.identities:
        kept = cluster.root / "cache" / node / "components"
        for name in ("shout.py", "greet.py"):
            sha = hashlib.sha256((folder / name).read_bytes()).hexdigest()
            path = kept / f"{sha}.py"
            assert path.read_bytes() == (folder / name).read_bytes()
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sum("received component" in line for line in read_lines(cluster.log(node))) == 2
    # Again: the nodes use what they kept, and ask for nothing.
    cluster.orchestrate("- jobs:\n    - SHOUT: --skip-cache again\n")
    for node in cluster.identities:
        assert sum("received component" in line for line in read_lines(cluster.log(node))) == 2


def test_a_component_changed_on_the_server_is_refused_for_old_jobs(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(nodes=1, start=False)
    folder = cluster.root / "components"
    folder.mkdir(mode=0o755)
    (folder / "shout.py").write_text(SHOUT)
    (folder / "shout.py").chmod(0o644)
    cluster.config.write_text(f"components_path: {folder}\n")
    cluster.start()
    # The node is away: the job waits for it, and the file changes on the server.
    cluster.stop_process("node0")
    [parent] = cluster.json("exec", "--verb", "SHOUT", "later", "--target", "node0")
    (folder / "shout.py").write_text(SHOUT.replace("upper()", "lower()"))
    cluster.stop_process("server")
    cluster.start_server()
    cluster.start_client("node0")
    from tests.e2e.helpers import wait_job

    result = wait_job(cluster, parent["jobs"][0])["results"]["node0"]
    assert result["state"] == "failed"
    assert "no longer has component file shout.py as it was for this job" in result["stderr"]
