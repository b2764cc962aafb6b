"""Component argument parsing (the pure half), job building and fingerprints."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from directord.agent.cache import EVICTABLE
from directord.components import ExecHelp, build_job, get_component, known_verbs
from directord.components.base import DEFAULT_TIMEOUT, split_leading_options
from directord.components.copy import per_node_identity
from directord.errors import ComponentArgsError, OrchestrationError
from directord.models import TRANSIENT_OPTIONS, FileRef, SourceFile, job_sha

BUILTINS = [
    "ADD",
    "ARG",
    "CACHEEVICT",
    "CACHEFILE",
    "COPY",
    "ECHO",
    "ENV",
    "JOB_WAIT",
    "QUERY",
    "QUERY_WAIT",
    "RUN",
    "WAIT",
    "WORKDIR",
]


def parse(verb: str, args: str, job_vars: dict[str, Any] | None = None) -> dict[str, Any]:
    return get_component(verb).parse(args, job_vars)


def bad(verb: str, args: str, words: str = "", job_vars: dict[str, Any] | None = None) -> str:
    with pytest.raises(ComponentArgsError) as info:
        parse(verb, args, job_vars)
    assert words in str(info.value)
    return str(info.value)


def test_every_builtin_is_registered() -> None:
    assert set(BUILTINS) <= set(known_verbs())
    for verb in BUILTINS:
        component = get_component(verb)
        assert component.verb == verb
        assert get_component(verb.lower()) is component  # cached, case-insensitive


def test_unknown_verb_suggests_closest() -> None:
    with pytest.raises(ComponentArgsError, match=r"did you mean QUERY\?"):
        get_component("QUERRY")


@pytest.mark.parametrize("verb", BUILTINS)
def test_common_option_defaults(verb: str) -> None:
    args = {
        "ARG": "k v",
        "ENV": "k v",
        "WORKDIR": "/tmp/x",
        "ADD": "a b",
        "COPY": "a b",
        "CACHEFILE": "/f",
        "CACHEEVICT": "all",
        "QUERY": "k",
        "QUERY_WAIT": "k",
        "JOB_WAIT": "abc",
        "WAIT": "--seconds 1",
        "RUN": "true",
        "ECHO": "x",
    }[verb]
    options = parse(verb, args)
    assert options["timeout"] == DEFAULT_TIMEOUT
    assert options["skip_cache"] is False and options["run_once"] is False
    assert options["force_lock"] is False
    assert options["stdout_arg"] is None and options["stderr_arg"] is None
    assert "exec_help" not in options


@pytest.mark.parametrize("verb", BUILTINS)
def test_exec_help_raises_with_the_verbs_help(verb: str) -> None:
    with pytest.raises(ExecHelp) as info:
        parse(verb, "--exec-help")
    assert info.value.text.startswith(f"usage: {verb}")
    assert "--skip-cache" in info.value.text and "--timeout" in info.value.text


def test_common_options_parse() -> None:
    options = parse(
        "ECHO",
        "--skip-cache --run-once --timeout 5 --force-lock --stdout-arg out --stderr-arg=err hello",
    )
    assert options == {
        "skip_cache": True,
        "run_once": True,
        "timeout": 5.0,
        "force_lock": True,
        "stdout_arg": "out",
        "stderr_arg": "err",
        "argv": "hello",
    }


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("--timeout 0 echo", "--timeout must be > 0"),
        ("--timeout -3 echo", "--timeout must be > 0"),
        ("--timeout soon echo", "invalid float value"),
        ("--timeout", "expects a value"),
        ("--timeout=", "invalid float value"),
        ("--stdout-arg --timeout 5 echo", "expected one argument"),
    ],
)
def test_common_option_errors(args: str, words: str) -> None:
    bad("RUN", args, words)


# ---- RUN ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "command",
    [
        "echo hi",
        "echo \"a  b\" | grep 'a  b' && ls -l > /tmp/out 2>&1; echo $HOME",
        "for i in 1 2 3; do echo $i; done | wc -l",
        "python3 -c 'import sys; print(sys.argv)' --timeout 5",
        "echo --timeout 9 --retry 3",
        "\"/bin/echo\" 'quoted first word'",
        "echo '#not a comment' # a comment",
        "-n is not an option here",
        "echo ${VAR:-default} `date` $(id -u)",
        "echo tab\there",
        "cat <<EOF\nline 1\nEOF",
    ],
)
def test_run_keeps_the_command_verbatim(command: str) -> None:
    options = parse("RUN", command)
    assert options["argv"] == command
    assert options["timeout"] == DEFAULT_TIMEOUT and options["retry"] == 0


def test_run_leading_options_then_verbatim_command() -> None:
    options = parse("RUN", "--timeout 5 --retry 2 --no-block   echo  'x  y' | cat  ")
    assert options["timeout"] == 5.0 and options["retry"] == 2 and options["no_block"] is True
    assert options["argv"] == "echo  'x  y' | cat"


def test_run_timeout_with_equals_and_quoted_option_values() -> None:
    options = parse("RUN", "--timeout=2.5 --stdout-arg 'my key' echo hi")
    assert options["timeout"] == 2.5
    assert options["stdout_arg"] == "my key"
    assert options["argv"] == "echo hi"


def test_run_options_after_the_command_belong_to_the_command() -> None:
    options = parse("RUN", "echo --timeout 5")
    assert options["timeout"] == DEFAULT_TIMEOUT
    assert options["argv"] == "echo --timeout 5"


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("", "a command is required"),
        ("   ", "a command is required"),
        ("--timeout 5", "a command is required"),
        ("--retry -1 echo", "--retry must be >= 0"),
        ("--retry many echo", "invalid int value"),
        ("--bogus echo", "unrecognized option --bogus"),
        ("--time-out 5 echo", "unrecognized option --time-out"),
        ("--time 5 echo", "unrecognized option --time"),  # no argparse abbreviations
        ("--stdout-arg 'unterminated echo", "No closing quotation"),
    ],
)
def test_run_errors(args: str, words: str) -> None:
    bad("RUN", args, words)


# ---- split_leading_options ------------------------------------------------------------------


def _parser() -> Any:
    return get_component("RUN")._parser


@pytest.mark.parametrize(
    ("text", "flags", "rest"),
    [
        ("", [], ""),
        ("   ", [], ""),
        ("--no-block", ["--no-block"], ""),
        ("--no-block  ", ["--no-block"], ""),
        ("--timeout 5", ["--timeout", "5"], ""),
        ("--timeout=5 x", ["--timeout=5"], "x"),
        ("--timeout '5' x 'y z'", ["--timeout", "5"], "x 'y z'"),
        ('--stdout-arg "a b" cmd', ["--stdout-arg", "a b"], "cmd"),
        ("cmd --timeout 5", [], "cmd --timeout 5"),
        ("  cmd  a  ", [], "cmd  a"),
        ("'quoted cmd' x", [], "'quoted cmd' x"),
        ("--no-block -- echo", ["--no-block"], "-- echo"),
        ("--no-block -x", ["--no-block"], "-x"),
        ("--no-block\techo", ["--no-block"], "echo"),
        ("--retry 2 --no-block echo | tee f", ["--retry", "2", "--no-block"], "echo | tee f"),
    ],
)
def test_split_leading_options(text: str, flags: list[str], rest: str) -> None:
    assert split_leading_options(text, _parser()) == (flags, rest)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("--retry", "expects a value"),
        ("--nope x", "unrecognized option --nope"),
        ('--timeout "5', "No closing quotation"),
    ],
)
def test_split_leading_options_errors(text: str, words: str) -> None:
    with pytest.raises(ComponentArgsError, match=words):
        split_leading_options(text, _parser())


# ---- other built-ins ------------------------------------------------------------------------


def test_echo_keeps_text_verbatim_and_allows_empty() -> None:
    assert parse("ECHO", "Hello {{ name }} | 'x'")["argv"] == "Hello {{ name }} | 'x'"
    assert parse("ECHO", "")["argv"] == ""


@pytest.mark.parametrize(
    ("args", "key", "value"),
    [
        ("n 1", "n", 1),
        ("f 1.5", "f", 1.5),
        ("l ['a', 'b']", "l", ["a", "b"]),
        ('d {"a": "b"}', "d", {"a": "b"}),
        ("y {a: 1}", "y", {"a": 1}),
        ("b true", "b", True),
        ("B True", "B", True),
        ("s hello world", "s", "hello world"),
        ("s 'quoted'", "s", "quoted"),
        ("p /etc/x.conf", "p", "/etc/x.conf"),
        ("t {{ other }}", "t", "{{ other }}"),
    ],
)
def test_arg_parses_literal_values(args: str, key: str, value: Any) -> None:
    options = parse("ARG", args)
    assert options["key"] == key
    assert options["value"] == value
    assert type(options["value"]) is type(value)


def test_env_keeps_values_as_text() -> None:
    options = parse("ENV", "PORT 8080")
    assert (options["key"], options["value"]) == ("PORT", "8080")
    assert parse("ENV", "LIST ['a']")["value"] == "['a']"


def test_arg_extend_args() -> None:
    options = parse("ARG", "--extend-args pkgs ['vim']")
    assert options["extend_args"] is True and options["value"] == ["vim"]
    assert parse("ARG", "pkgs ['vim']")["extend_args"] is False


@pytest.mark.parametrize("verb", ["ARG", "ENV"])
@pytest.mark.parametrize("args", ["", "onlykey", "--extend-args key"])
def test_arg_env_need_key_and_value(verb: str, args: str) -> None:
    bad(verb, args, "expected KEY VALUE")


def test_workdir() -> None:
    options = parse("WORKDIR", "--chown app:app --chmod 0750 /srv/app")
    assert options["argv"] == ["/srv/app"]
    assert options["chown"] == "app:app" and options["chmod"] == "0750"
    assert parse("WORKDIR", "'/path with space'")["argv"] == ["/path with space"]


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("", "exactly one PATH"),
        ("/a /b", "exactly one PATH"),
        ("--chmod rwx /a", "not an octal mode"),
        ("--chmod 77777 /a", "out of range"),
        ("'/unterminated", "No closing quotation"),
    ],
)
def test_workdir_errors(args: str, words: str) -> None:
    bad("WORKDIR", args, words)


@pytest.mark.parametrize("verb", ["COPY", "ADD"])
def test_copy_parse(verb: str) -> None:
    options = parse(verb, "--chmod 0644 --blueprint 'conf/*.j2' /etc/app/")
    assert (options["src"], options["dest"]) == ("conf/*.j2", "/etc/app/")
    assert options["blueprint"] is True and options["chmod"] == "0644"
    assert "argv" not in options


@pytest.mark.parametrize("verb", ["COPY", "ADD"])
@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("only-src", "expected SRC_GLOB DEST"),
        ("a b c", "expected SRC_GLOB DEST"),
        ("--chmod 9 a b", "not an octal mode"),
    ],
)
def test_copy_errors(verb: str, args: str, words: str) -> None:
    bad(verb, args, words)


def test_copy_source_files_globs_and_hashes(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_bytes(b"alpha\n")
    (tmp_path / "b.conf").write_bytes(b"")
    (tmp_path / "c.txt").write_bytes(b"other")
    (tmp_path / "dir.conf").mkdir()
    component = get_component("COPY")
    files = component.source_files(component.parse("*.conf /dest/"), str(tmp_path))
    assert files == [
        SourceFile(
            str(tmp_path / "a.conf"),
            FileRef("a.conf", 6, hashlib.sha256(b"alpha\n").hexdigest()),
        ),
        SourceFile(str(tmp_path / "b.conf"), FileRef("b.conf", 0, hashlib.sha256(b"").hexdigest())),
    ]


def test_copy_source_files_without_matches(tmp_path: Path) -> None:
    component = get_component("COPY")
    with pytest.raises(ComponentArgsError, match="no file matches"):
        component.source_files(component.parse("*.none /dest/"), str(tmp_path))


def test_per_node_copy_never_takes_a_reserved_or_invalid_name(tmp_path: Path) -> None:
    # The server's own secret sits beside the nodes' (ZeroMQ key layout): a per-node
    # COPY must not even upload it, nor the shared client key, nor the CA's key.
    for name in ("node1", "web.example.net", "server", "client", "ca", "-x", ".hidden"):
        (tmp_path / f"{name}.key_secret").write_text(name)
    component = get_component("COPY")
    options = component.parse(f"--per-node {tmp_path}/{{identity}}.key_secret /keys/")
    names = [f.ref.name for f in component.source_files(options, "/")]
    assert names == ["node1.key_secret", "web.example.net.key_secret"]


@pytest.mark.parametrize(
    ("src", "name", "identity"),
    [
        ("{identity}.key_secret", "node1.key_secret", "node1"),
        ("/k/{identity}.key_secret", "server.key_secret", None),
        ("/k/{identity}.key_secret", "CLIENT.key_secret", None),
        ("a-{identity}-{identity}.pem", "a-n1-n1.pem", "n1"),
        ("a-{identity}-{identity}.pem", "a-n1-n2.pem", None),
        ("{identity}.pem", "x y.pem", None),
        ("plain.pem", "plain.pem", None),
    ],
)
def test_per_node_identity(src: str, name: str, identity: str | None) -> None:
    assert per_node_identity(src, name) == identity


def test_build_job_prepares_copy_and_names_the_line(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    spec = build_job("COPY", "f /etc/f", cwd=str(tmp_path))
    assert [f.name for f in spec.files] == ["f"]
    assert [s.path for s in spec.sources] == [str(tmp_path / "f")]
    # The server builds the same job from the uploaded refs alone: same fingerprint.
    again = build_job("COPY", "f /etc/f", prepare=False, files=spec.files)
    assert again.sha == spec.sha and again.sources == ()
    # A file's content is part of what the job is.
    (tmp_path / "f").write_text("y")
    assert build_job("COPY", "f /etc/f", cwd=str(tmp_path)).sha != spec.sha
    with pytest.raises(OrchestrationError) as info:
        build_job("COPY", "missing /etc/f", cwd=str(tmp_path), where="x.yaml", line=7)
    assert (info.value.path, info.value.line) == ("x.yaml", 7)


def test_only_a_file_component_takes_files() -> None:
    with pytest.raises(OrchestrationError, match="RUN takes no files"):
        build_job("RUN", "true", prepare=False, files=[FileRef("f", 1, "0" * 64)])


def test_cachefile() -> None:
    assert parse("CACHEFILE", "/etc/facts.yaml")["argv"] == ["/etc/facts.yaml"]
    bad("CACHEFILE", "", "exactly one PATH")
    bad("CACHEFILE", "a b", "exactly one PATH")


@pytest.mark.parametrize("what", EVICTABLE)
def test_cacheevict_accepts_each_part(what: str) -> None:
    assert parse("CACHEEVICT", what)["argv"] == [what]


@pytest.mark.parametrize("args", ["", "everything", "args envs", "ARGS"])
def test_cacheevict_errors(args: str) -> None:
    message = bad("CACHEEVICT", args, "expected one of")
    assert "parents" in message


def test_query_and_query_wait() -> None:
    assert parse("QUERY", "hostname")["argv"] == ["hostname"]
    assert parse("QUERY", "--no-wait hostname")["no_wait"] is True
    options = parse("QUERY_WAIT", "--query-timeout 5 --identity n1 --identity n2 hostname")
    assert options["query_timeout"] == 5.0
    assert options["identity"] == ["n1", "n2"]
    assert options["argv"] == ["hostname"]
    assert parse("QUERY_WAIT", "k")["identity"] == []
    bad("QUERY", "", "exactly one KEY")
    bad("QUERY", "a b", "exactly one KEY")
    bad("QUERY_WAIT", "--identity n1", "exactly one KEY")
    bad("QUERY_WAIT", "--query-timeout x k", "invalid float value")


def test_job_wait() -> None:
    sha = "a" * 56
    options = parse("JOB_WAIT", f"--job-timeout 30 --identity node1 {sha}")
    assert options["job_timeout"] == 30.0 and options["identity"] == ["node1"]
    assert options["argv"] == [sha]
    bad("JOB_WAIT", "", "exactly one job SHA")
    bad("JOB_WAIT", "--identity n1", "exactly one job SHA")


def test_wait_modes() -> None:
    options = parse("WAIT", "--seconds 2.5")
    assert options["seconds"] == 2.5 and "argv" not in options
    options = parse("WAIT", "--url https://example.invalid/health --retry 3 --insecure")
    assert options["url"] == "https://example.invalid/health"
    assert options["retry"] == 3 and options["insecure"] is True
    options = parse("WAIT", "--cmd --retry 5 --retry-wait 0.5 test -f '/tmp/a b' && echo ok")
    assert options["command"] == "test -f '/tmp/a b' && echo ok"
    assert options["retry"] == 5 and options["retry_wait"] == 0.5
    assert parse("WAIT", "--seconds 0")["seconds"] == 0.0


@pytest.mark.parametrize(
    ("args", "words"),
    [
        ("", "one of --seconds, --url or --cmd is required"),
        ("--retry 3", "one of --seconds, --url or --cmd is required"),
        ("--cmd", "--cmd needs a command"),
        ("--seconds 1 extra words", "unexpected arguments"),
        ("--seconds 1 --url http://x", "not allowed with argument"),
        ("--seconds soon", "invalid float value"),
        ("--cmd --retry 0 true", "--retry must be >= 1"),
    ],
)
def test_wait_errors(args: str, words: str) -> None:
    bad("WAIT", args, words)


# ---- vars override options ------------------------------------------------------------------


def test_vars_override_same_named_options() -> None:
    options = parse(
        "RUN",
        "--timeout 5 echo",
        {"timeout": 30, "retry": 2, "no_block": True, "stdout_arg": "out", "greeting": "hi"},
    )
    assert options["timeout"] == 30 and options["retry"] == 2 and options["no_block"] is True
    assert options["stdout_arg"] == "out"
    assert "greeting" not in options  # other vars are template values, not options
    assert options["argv"] == "echo"


def test_vars_never_replace_the_positional_arguments() -> None:
    assert parse("RUN", "echo safe", {"argv": "rm -rf /"})["argv"] == "echo safe"


@pytest.mark.parametrize(
    ("job_vars", "words"),
    [
        ({"timeout": "soon"}, "vars.timeout must be a number"),
        ({"retry": [1]}, "vars.retry must be a number"),
        ({"skip_cache": "yes"}, "vars.skip_cache must be true or false"),
        ({"no_block": 1}, "vars.no_block must be true or false"),
        ({"timeout": True}, "vars.timeout must be a number"),
        ({"retry": 1.5}, "vars.retry must be a whole number"),
        ({"retry": False}, "vars.retry must be a number"),
        ({"timeout": 0}, "--timeout must be > 0"),
        ({"retry": -2}, "--retry must be >= 0"),
    ],
)
def test_vars_override_type_checks(job_vars: dict[str, Any], words: str) -> None:
    bad("RUN", "echo", words, job_vars)


def test_vars_override_through_build_job() -> None:
    spec = build_job("RUN", "echo", job_vars={"timeout": 12, "skip_cache": True, "run_once": True})
    assert spec.timeout == 12.0 and spec.skip_cache is True and spec.run_once is True
    assert spec.vars == {"timeout": 12, "skip_cache": True, "run_once": True}
    with pytest.raises(OrchestrationError, match="vars must be a mapping"):
        build_job("RUN", "echo", job_vars=["x"])  # type: ignore[arg-type]


# ---- build_job and job_sha ------------------------------------------------------------------


def test_build_job_spec() -> None:
    spec = build_job(
        "run", "--timeout 9 --run-once echo hi", name="n", assign=("node0",), job_vars={"v": 1}
    )
    assert spec.verb == "RUN"
    assert spec.timeout == 9.0 and spec.run_once is True and spec.skip_cache is False
    assert spec.name == "n" and spec.assign == ("node0",) and spec.vars == {"v": 1}
    assert "timeout" not in spec.options and "run_once" not in spec.options
    assert "skip_cache" not in spec.options
    assert spec.options["argv"] == "echo hi"
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.verb = "ECHO"  # type: ignore[misc]


def test_build_job_skip_cache_from_option_or_argument() -> None:
    assert build_job("RUN", "--skip-cache echo").skip_cache is True
    assert build_job("RUN", "echo", skip_cache=True).skip_cache is True
    assert build_job("RUN", "echo").skip_cache is False


def test_build_job_errors_name_where_and_line() -> None:
    with pytest.raises(OrchestrationError) as info:
        build_job("RUN", "--bogus x", where="f.yaml", line=3)
    assert (info.value.path, info.value.line) == ("f.yaml", 3)
    with pytest.raises(OrchestrationError, match="unknown verb"):
        build_job("NOPE", "x")
    with pytest.raises(ExecHelp):
        build_job("RUN", "--exec-help")


def test_job_sha_is_pinned() -> None:
    # Nodes persist fingerprints in their cache: a change here re-runs every cached job.
    assert build_job("RUN", "echo hi").sha == (
        "cd810ab7b838673fc4e49033c04e16f915442e9382bf754725e1a859"
    )


def test_job_sha_stable_and_ignores_transient_options() -> None:
    base = build_job("RUN", "echo hi").sha
    assert build_job("RUN", "echo hi").sha == base
    assert build_job("run", "echo hi").sha == base
    assert build_job("RUN", "--skip-cache echo hi").sha == base
    assert build_job("RUN", "--force-lock echo hi").sha == base
    assert build_job("RUN", "echo hi", skip_cache=True).sha == base
    assert build_job("RUN", "echo hi", job_vars={"skip_cache": True}).sha == base
    assert build_job("RUN", "echo hi", name="other name").sha == base


@pytest.mark.parametrize(
    ("verb", "args"),
    [
        ("RUN", "echo  hi"),
        ("RUN", "echo ho"),
        ("RUN", "--timeout 5 echo hi"),
        ("RUN", "--run-once echo hi"),
        ("RUN", "--retry 1 echo hi"),
        ("RUN", "--stdout-arg k echo hi"),
        ("ECHO", "echo hi"),
    ],
)
def test_job_sha_changes_with_the_definition(verb: str, args: str) -> None:
    assert build_job(verb, args).sha != build_job("RUN", "echo hi").sha


def test_job_sha_function() -> None:
    a = job_sha("RUN", {"argv": "x", "retry": 0}, 600.0, False)
    assert len(a) == 56 and int(a, 16) >= 0
    assert job_sha("RUN", {"retry": 0, "argv": "x"}, 600.0, False) == a  # key order
    transient = {k: True for k in TRANSIENT_OPTIONS}
    assert job_sha("RUN", {"argv": "x", "retry": 0, **transient}, 600.0, False) == a
    assert job_sha("RUN", {"argv": "x", "retry": 0}, 601.0, False) != a
    assert job_sha("RUN", {"argv": "x", "retry": 0}, 600.0, True) != a
    assert job_sha("ECHO", {"argv": "x", "retry": 0}, 600.0, False) != a
    assert {"skip_cache", "force_lock", "exec_help"} <= TRANSIENT_OPTIONS


def test_a_broken_user_component_is_skipped_and_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import directord.components as registry

    (tmp_path / "broken.py").write_text("this is not python(\n")
    (tmp_path / "fails_init.py").write_text(
        "from directord.components.base import Component\n"
        "class Bad(Component):\n"
        "    verb = 'BADINIT'\n"
        "    summary = 'fails'\n"
        "    async def execute(self, options, ctx):\n"
        "        raise NotImplementedError\n"
        "    def __init__(self):\n"
        "        raise RuntimeError('no')\n"
    )
    (tmp_path / "hello.py").write_text(
        "from directord.components.base import Component\n"
        "class Hello(Component):\n"
        "    verb = 'HELLO'\n"
        "    summary = 'says hello'\n"
        "    async def execute(self, options, ctx):\n"
        "        raise NotImplementedError\n"
    )
    monkeypatch.setattr(registry, "_USER_DIR", str(tmp_path))
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_INSTANCES", {})
    registry.preload()  # does not raise: the daemon starts with what loads
    verbs = known_verbs()
    assert "HELLO" in verbs and "RUN" in verbs
    assert "BADINIT" not in verbs
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert any("broken.py" in e and "SyntaxError" in e for e in errors), errors
    assert any("BADINIT" in e and "RuntimeError" in e for e in errors), errors


def _user_component(path: Path, verb: str) -> None:
    path.write_text(
        "from directord.components.base import Component\n"
        f"class C(Component):\n"
        f"    verb = '{verb}'\n"
        "    summary = 'test'\n"
        "    async def execute(self, options, ctx):\n"
        "        raise NotImplementedError\n"
    )
    path.chmod(0o644)


def test_user_components_load_only_from_files_no_one_else_can_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Components run as the node agent (root): a file another user can change is a way
    # to run code as root, so it is skipped, and said so.
    import directord.components as registry

    folder = tmp_path / "components"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    _user_component(folder / "good.py", "GOODONE")
    _user_component(folder / "groupw.py", "GROUPW")
    (folder / "groupw.py").chmod(0o664)
    _user_component(folder / "worldw.py", "WORLDW")
    (folder / "worldw.py").chmod(0o646)
    _user_component(folder / "other.py", "OTHEROWNER")
    os.chown(folder / "other.py", 65534, 65534)  # the tests run as root, as the agent does
    _user_component(tmp_path / "target.py", "VIALINK")
    (folder / "link.py").symlink_to(tmp_path / "target.py")
    monkeypatch.setattr(registry, "_USER_DIR", str(folder))
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_INSTANCES", {})
    verbs = known_verbs()
    assert "GOODONE" in verbs
    assert not {"GROUPW", "WORLDW", "OTHEROWNER", "VIALINK"} & set(verbs)
    errors = " | ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "groupw.py: it is writable by group or others (mode 0664)" in errors
    assert "worldw.py: it is writable by group or others (mode 0646)" in errors
    assert "other.py: it is owned by uid 65534" in errors
    assert "link.py: it is a symbolic link" in errors


def test_a_components_directory_others_can_write_is_skipped_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import directord.components as registry

    folder = tmp_path / "components"
    folder.mkdir()
    _user_component(folder / "good.py", "INOPENDIR")
    folder.chmod(0o777)
    monkeypatch.setattr(registry, "_USER_DIR", str(folder))
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_INSTANCES", {})
    assert "INOPENDIR" not in known_verbs()
    assert any(
        "skipped the components directory" in r.getMessage() and "0777" in r.getMessage()
        for r in caplog.records
    )


def test_new_directories_are_0755_under_the_agents_umask(tmp_path: Path) -> None:
    from directord.components.files import make_directories

    (tmp_path / "keep").mkdir(mode=0o700)
    old = os.umask(0o077)
    try:
        make_directories(str(tmp_path / "keep" / "a" / "b"))
        make_directories(str(tmp_path / "leaf"), 0o750)
    finally:
        os.umask(old)
    assert (tmp_path / "keep").stat().st_mode & 0o777 == 0o700  # existing: untouched
    assert (tmp_path / "keep" / "a").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "keep" / "a" / "b").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "leaf").stat().st_mode & 0o777 == 0o750


def test_a_component_is_imported_when_its_verb_is_first_asked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A command running one verb imports that component only; a broken plugin is
    # logged and skipped when loaded, and a user's file for its verb takes its place.
    from importlib.metadata import EntryPoint

    import directord.components as registry

    group = "directord.components"
    found = [
        EntryPoint("ECHO", "directord.components.no_such_module:Echo", group),
        EntryPoint("ECHO", "directord.components.echo:Echo", group),
        EntryPoint("BROKEN", "directord.components.no_such_module:Broken", group),
        EntryPoint("MINE", "directord.components.no_such_module:Mine", group),
    ]
    monkeypatch.setattr(registry, "_entry_points", lambda: found)
    folder = tmp_path / "components"
    folder.mkdir(mode=0o755)
    folder.chmod(0o755)
    _user_component(folder / "mine.py", "MINE")
    _user_component(folder / "echo.py", "ECHO")
    monkeypatch.setattr(registry, "_USER_DIR", str(folder))
    monkeypatch.setattr(registry, "_REGISTRY", {})
    monkeypatch.setattr(registry, "_INSTANCES", {})
    monkeypatch.setattr(registry, "_SOURCES", {})
    assert get_component("echo").verb == "ECHO"  # the last registration that loads
    assert registry.source_of("ECHO") is None
    assert isinstance(registry._REGISTRY["BROKEN"], registry._Unloaded)
    assert not caplog.records
    assert get_component("MINE").summary == "test"  # its entry point is broken
    assert registry.source_of("MINE") is not None
    with pytest.raises(ComponentArgsError, match="unknown verb 'BROKEN'"):
        get_component("BROKEN")
    assert known_verbs() == ["ECHO", "MINE"]
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    # The first ECHO is never imported: the last registration of a verb wins.
    assert len(errors) == 2 and all("No module named" in e for e in errors), errors
