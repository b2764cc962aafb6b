"""Bootstrap catalogs: Directord's format, merged as Directord merges, errors with file and line."""

from __future__ import annotations

from pathlib import Path

import pytest

from directord.bootstrap.catalog import SHIPPED_DIR, CatalogError, load, merge, template_context
from directord.bootstrap.ssh import HostRun, SshSettings, Step, StepFailed


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_merge_extends_lists_merges_mappings_and_replaces_the_rest() -> None:
    base = {"a": {"x": 1, "l": [1]}, "s": "old", "l": [1]}
    merge(base, {"a": {"y": 2, "l": [2]}, "s": "new", "l": [2, 3]})
    assert base == {"a": {"x": 1, "y": 2, "l": [1, 2]}, "s": "new", "l": [1, 2, 3]}


def test_two_files_merge_targets_and_jobs_in_order_with_their_lines(tmp_path: Path) -> None:
    jobs = write(
        tmp_path,
        "jobs.yaml",
        "directord_clients:\n  args: {port: 2222, username: ops}\n  jobs:\n"
        "  - RUN: echo one\n  - [ADD: a b, [GET: c d]]\n---\n",
    )
    hosts = write(
        tmp_path,
        "hosts.yaml",
        "directord_clients:\n  targets:\n  - {host: 10.0.0.1, name: n1}\n"
        "  - {host: 10.0.0.2, port: 22, username: root, vars: {root: /x}}\n"
        "  jobs:\n  - LOCAL: echo last\n",
    )
    catalog = load([jobs, hosts])
    assert [(h.host, h.port, h.username, h.name) for h in catalog.hosts] == [
        ("10.0.0.1", 2222, "ops", "n1"),
        ("10.0.0.2", 22, "root", ""),
    ]
    steps = catalog.hosts[0].steps
    assert [(s.kind, s.text, Path(s.source).name, s.line) for s in steps] == [
        ("RUN", "echo one", "jobs.yaml", 4),
        ("ADD", "a b", "jobs.yaml", 5),
        ("GET", "c d", "jobs.yaml", 5),
        ("LOCAL", "echo last", "hosts.yaml", 6),
    ]
    context = template_context(catalog, catalog.hosts[1])
    assert context["root"] == "/x" and context["become"] == ""
    assert context["directord_bootstrap"]["host"] == "10.0.0.2"
    assert template_context(catalog, catalog.hosts[0])["become"] == "sudo -n "


def test_a_server_section_without_jobs_only_names_hosts_for_templates(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "c.yaml",
        "directord_server:\n  targets: [{host: 10.0.0.9}]\n"
        "directord_clients:\n  targets: [{host: 10.0.0.1}]\n  jobs: [RUN: 'echo hi']\n",
    )
    catalog = load([path])
    assert [h.section for h in catalog.hosts] == ["directord_clients"]
    context = template_context(catalog, catalog.hosts[0])
    assert context["directord_server"]["targets"][0]["host"] == "10.0.0.9"


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            "directord_clients:\n  targets: []\n  jbos: []\n",
            3,
            "directord_clients: unknown key 'jbos'",
        ),
        ("directord_clients:\n  jobs:\n  - COPY: a b\n", 3, "unknown job 'COPY'"),
        ("directord_clients:\n  jobs:\n  - ADD: onlyone\n", 3, "ADD takes two paths: LOCAL REMOTE"),
        ("directord_clients:\n  jobs:\n  - {RUN: a, GET: b c}\n", 3, "a job is one `KIND:"),
        ("directord_clients:\n  targets:\n  - {port: 22}\n", 3, "a target needs `host`"),
        ("directord_clients:\n  targets:\n  - {host: h, port: 70000}\n", 3, "`port` must be"),
        ("directord_clients:\n  targets:\n  - {host: h, name: 'a b'}\n", 3, "target name 'a b'"),
        ("directord_clients: [1]\n", 1, "must be a mapping"),
        ("- a\n", 1, "a catalog is a mapping"),
        ("a: [\n", 2, "YAML error"),
    ],
)
def test_malformed_catalogs_are_refused_with_file_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write(tmp_path, "bad.yaml", text)
    with pytest.raises(CatalogError) as info:
        load([path])
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert message in str(info.value)


def test_no_host_with_jobs_and_unreadable_files_are_refused(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "directord_clients:\n  targets: [{host: h}]\n")
    with pytest.raises(CatalogError, match="no host to bootstrap"):
        load([path])
    with pytest.raises(CatalogError, match="cannot read"):
        load([str(tmp_path / "missing.yaml")])
    with pytest.raises(CatalogError, match="no catalog given"):
        load([])


@pytest.mark.parametrize("name", ["grpc.yaml", "grpc-mtls.yaml", "zmq-curve.yaml"])
def test_shipped_catalogs_load_by_name_and_render_every_step(name: str, tmp_path: Path) -> None:
    """Every step of a shipped catalog renders (no undefined variable) for a server and a client."""
    hosts = write(
        tmp_path,
        "hosts.yaml",
        "directord_server:\n  targets: [{host: 10.0.0.1, name: server1}]\n"
        "directord_clients:\n  targets: [{host: 10.0.0.2, name: node1, username: root}]\n",
    )
    catalog = load([name, hosts])
    assert Path(catalog.hosts[0].steps[0].source).parent == SHIPPED_DIR
    for host in catalog.hosts:
        run = HostRun(catalog, host, SshSettings())
        for step in host.steps:
            assert run.render(step).strip(), step.where
    client = catalog.hosts[1]
    rendered = "\n".join(HostRun(catalog, client, SshSettings()).render(s) for s in client.steps)
    assert "sudo" not in rendered  # root needs no sudo
    assert "systemctl enable --now directord-client.service" in rendered


def test_a_template_error_is_a_step_failure_not_a_crash(tmp_path: Path) -> None:
    path = write(
        tmp_path, "c.yaml", "directord_clients:\n  targets: [{host: h}]\n  jobs: [RUN: x]\n"
    )
    catalog = load([path])
    run = HostRun(catalog, catalog.hosts[0], SshSettings())
    with pytest.raises(StepFailed, match="template error: 'nope' is undefined"):
        run.render(Step("RUN", "echo {{ nope }}", "c.yaml", 1))
    assert run.render(Step("RUN", "echo {{ 'a b' | quote }}", "c.yaml", 1)) == "echo 'a b'"
