"""Orchestration files: normalised form with lines, and errors naming file and line."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from directord.components import ExecHelp
from directord.errors import OrchestrationError
from directord.orchestration import check, from_python, load_files, load_text

SRC = "orch.yaml"


def load(text: str) -> list[dict]:
    return load_text(textwrap.dedent(text).lstrip("\n"), SRC)


def error(text: str) -> OrchestrationError:
    with pytest.raises(OrchestrationError) as info:
        orchs = load(text)
        check(orchs)
    assert info.value.path == SRC
    return info.value


VALID = """
- name: deploy
  targets: [node0, node1, 7]
  async: true
  jobs:
    - RUN: echo "hi there" | tr a-z A-Z > /tmp/out
      name: shout
      vars: {greeting: hello, n: 1}
    - ECHO:
    - ARG: key ['a', 'b']
      assign: [node0]
- jobs:
    - WAIT: --seconds 1
"""


def test_valid_file_is_normalised_with_lines() -> None:
    orchs = load(VALID)
    assert orchs == [
        {
            "name": "deploy",
            "targets": ["node0", "node1", "7"],
            "async": True,
            "source": SRC,
            "line": 1,
            "jobs": [
                {
                    "verb": "RUN",
                    "args": 'echo "hi there" | tr a-z A-Z > /tmp/out',
                    "name": "shout",
                    "vars": {"greeting": "hello", "n": 1},
                    "assign": [],
                    "line": 5,
                },
                {"verb": "ECHO", "args": "", "name": "", "vars": {}, "assign": [], "line": 8},
                {
                    "verb": "ARG",
                    "args": "key ['a', 'b']",
                    "name": "",
                    "vars": {},
                    "assign": ["node0"],
                    "line": 9,
                },
            ],
        },
        {
            "name": "",
            "targets": [],
            "async": False,
            "source": SRC,
            "line": 11,
            "jobs": [
                {
                    "verb": "WAIT",
                    "args": "--seconds 1",
                    "name": "",
                    "vars": {},
                    "assign": [],
                    "line": 12,
                },
            ],
        },
    ]
    check(orchs)  # every job builds


def test_numbers_as_args_become_text() -> None:
    (orch,) = load("- jobs:\n    - ECHO: 42\n")
    assert orch["jobs"][0]["args"] == "42"


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        ("- jobs:\n    - RUN: echo [unclosed\n  name: x\n bad\n", None, "YAML error"),
        ("- jobs: [\n", 2, "YAML error"),
        ('- jobs:\n    - RUN: "unterminated\n', None, "YAML error"),
    ],
)
def test_yaml_error_names_file_and_line(text: str, line: int | None, words: str) -> None:
    exc = error(text)
    assert words in exc.detail
    assert exc.line is not None and exc.line >= 1
    if line is not None:
        assert exc.line == line
    assert str(exc).startswith(f"{SRC}:{exc.line}: ")


def test_empty_file() -> None:
    exc = error("# only a comment\n")
    assert "empty" in exc.detail


@pytest.mark.parametrize(
    ("text", "line", "words"),
    [
        # not a list
        ("jobs:\n  - RUN: x\n", 1, "is a list of items"),
        ("just text\n", 1, "is a list of items"),
        # item not a mapping
        ("- jobs:\n    - RUN: x\n- plain string\n", 3, "must be a mapping"),
        # unknown key, with the expected ones listed
        ("- name: a\n  targets: [n]\n  jobz:\n    - RUN: x\n", 3, "unknown key 'jobz'"),
        # missing jobs: the item's own line
        ("- jobs:\n    - RUN: x\n- name: nothing to do\n  async: false\n", 3, "has no `jobs`"),
        # jobs not a (non-empty) list
        ("- name: a\n  jobs: RUN echo\n", 2, "non-empty list"),
        ("- name: a\n  jobs: []\n", 2, "non-empty list"),
        # job not a mapping
        ("- jobs:\n    - RUN: x\n    - RUN echo hi\n", 3, "a job must be a mapping"),
        # two verbs in one job
        (
            "- jobs:\n    - RUN: x\n    - name: both\n      RUN: a\n      ECHO: b\n",
            3,
            "exactly one verb, found 2 (RUN, ECHO)",
        ),
        # no verb in a job
        ("- jobs:\n    - name: nothing\n", 2, "exactly one verb, found 0"),
        # vars not a mapping
        ("- jobs:\n    - RUN: x\n      vars:\n        - a\n", 4, "`vars` must be a mapping"),
        # args not a string
        ("- jobs:\n    - RUN:\n        - echo\n", 3, "arguments of RUN must be a string"),
        ("- jobs:\n    - ECHO: {a: b}\n", 2, "arguments of ECHO must be a string"),
        # targets / assign / async types
        ("- targets: node0\n  jobs:\n    - RUN: x\n", 1, "targets must be a list"),
        ("- targets: [node0, [x]]\n  jobs:\n    - RUN: x\n", 1, "targets entries"),
        ("- async: yes please\n  jobs:\n    - RUN: x\n", 1, "`async` must be true or false"),
        ("- jobs:\n    - RUN: x\n      assign: [true]\n", 3, "assign entries"),
    ],
)
def test_structure_errors_name_file_and_line(text: str, line: int, words: str) -> None:
    exc = error(text)
    assert words in exc.detail
    assert exc.line == line
    assert str(exc) == f"{SRC}:{line}: {exc.detail}"


def test_unknown_key_lists_the_known_ones() -> None:
    exc = error("- jobz:\n    - RUN: x\n")
    for key in ("async", "jobs", "name", "targets"):
        assert key in exc.detail


def test_unknown_verb_suggests_the_closest() -> None:
    exc = error("- jobs:\n    - RUN: x\n    - RUM: echo hi\n")
    assert exc.line == 3
    assert "unknown verb 'RUM'" in exc.detail
    assert "did you mean RUN?" in exc.detail


def test_unknown_verb_without_a_close_match_lists_known_verbs() -> None:
    exc = error("- jobs:\n    - XYZZYQ: x\n")
    assert "did you mean" not in exc.detail
    assert "known verbs:" in exc.detail and "QUERY_WAIT" in exc.detail


def test_lowercase_verbs_are_accepted() -> None:
    orchs = load("- jobs:\n    - run: echo hi\n")
    check(orchs)
    assert orchs[0]["jobs"][0]["verb"] == "run"


@pytest.mark.parametrize(
    ("job", "words"),
    [
        ("RUN: --bogus-option echo", "unrecognized option --bogus-option"),
        ("RUN: --timeout soon echo", "--timeout"),
        ("RUN: --timeout 0 echo", "--timeout must be > 0"),
        ("RUN:", "a command is required"),
        ("WORKDIR: --chmod 999 /tmp/x", "not an octal mode"),
        ("CACHEEVICT: everything", "CACHEEVICT: expected one of"),
    ],
)
def test_bad_component_arguments_name_file_and_line(job: str, words: str) -> None:
    exc = error(f"- jobs:\n    - ECHO: fine\n    - {job}\n")
    assert exc.line == 3
    assert words in exc.detail


def test_bad_vars_for_a_component_name_the_line() -> None:
    exc = error("- jobs:\n    - RUN: echo\n      vars: {timeout: soon}\n")
    assert exc.line == 2
    assert "vars.timeout must be a number" in exc.detail


def test_check_raises_exec_help() -> None:
    with pytest.raises(ExecHelp) as info:
        check(load("- jobs:\n    - RUN: --exec-help\n"))
    assert "--no-block" in info.value.text


def test_check_does_not_touch_the_filesystem_for_copy() -> None:
    check(load("- jobs:\n    - COPY: /no/such/dir/*.conf /etc/app/\n"))


def test_load_files_concatenates_with_each_source(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("- jobs:\n    - ECHO: a\n")
    b.write_text("- name: second\n  jobs:\n    - ECHO: b1\n- jobs:\n    - ECHO: b2\n")
    orchs = load_files([str(a), str(b)])
    assert [(o["source"], o["jobs"][0]["args"]) for o in orchs] == [
        (str(a), "a"),
        (str(b), "b1"),
        (str(b), "b2"),
    ]
    assert orchs[2]["jobs"][0]["line"] == 5


def test_load_files_missing_file(tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(OrchestrationError) as info:
        load_files([missing])
    assert info.value.path == missing
    assert "cannot read" in info.value.detail


def test_error_in_second_file_names_that_file(tmp_path: Path) -> None:
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("- jobs:\n    - ECHO: a\n")
    b.write_text("- jobs:\n    - ECHO: b\n- nope: 1\n")
    with pytest.raises(OrchestrationError) as info:
        load_files([str(a), str(b)])
    assert (info.value.path, info.value.line) == (str(b), 3)


def test_from_python_normalises_like_a_file() -> None:
    orchs = from_python(
        [{"targets": ["n1"], "jobs": [{"RUN": "echo 'a | b'"}, {"ECHO": "x", "vars": {"v": [1]}}]}]
    )
    assert orchs[0]["targets"] == ["n1"]
    assert [(j["verb"], j["args"], j["vars"]) for j in orchs[0]["jobs"]] == [
        ("RUN", "echo 'a | b'", {}),
        ("ECHO", "x", {"v": [1]}),
    ]
    assert orchs[0]["source"] == "<library>"


def test_from_python_reports_structure_errors() -> None:
    with pytest.raises(OrchestrationError, match="has no `jobs`") as info:
        from_python([{"name": "x"}], source="<api>")
    assert info.value.path == "<api>"
