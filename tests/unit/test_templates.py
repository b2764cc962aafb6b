"""Template rendering on the node (Jinja2, StrictUndefined) and the job context's values."""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Any

import pytest

from directord.agent import context
from directord.agent.context import JobContext, render_template
from directord.errors import ComponentError


def test_renders_values_filters_and_loops() -> None:
    text = "{{ name }}-{{ n + 1 }} {{ items | join(',') }}{% for i in items %}[{{ i }}]{% endfor %}"
    assert render_template(text, {"name": "web", "n": 1, "items": ["a", "b"]}) == (
        "web-2 a,b[a][b]"
    )


def test_nested_values_and_trailing_newline_kept() -> None:
    text = "{{ query['node0']['ip'] }}\n"
    assert render_template(text, {"query": {"node0": {"ip": "10.0.0.1"}}}) == "10.0.0.1\n"


def test_no_html_escaping() -> None:
    assert render_template("{{ v }}", {"v": "<a & 'b'>"}) == "<a & 'b'>"


def test_undefined_name_is_an_error_naming_it() -> None:
    with pytest.raises(ComponentError) as info:
        render_template("echo {{ missing_key }}", {"other": 1})
    assert str(info.value) == "template error: 'missing_key' is undefined"


def test_undefined_attribute_is_an_error() -> None:
    with pytest.raises(ComponentError, match=r"template error: .*'nope'"):
        render_template("{{ d.nope }}", {"d": {}})


def test_undefined_in_a_condition_is_an_error() -> None:
    with pytest.raises(ComponentError, match="'flag' is undefined"):
        render_template("{% if flag %}x{% endif %}", {})


def test_syntax_error_names_the_line() -> None:
    with pytest.raises(ComponentError) as info:
        render_template("line one\n{{ unclosed ", {})
    assert str(info.value).startswith("template error: ")
    assert "(line 2)" in str(info.value)


def test_runtime_error_in_template_is_a_component_error() -> None:
    with pytest.raises(ComponentError, match="template error"):
        render_template("{{ 'x' | no_such_filter }}", {})


@pytest.mark.parametrize(
    "text",
    [
        "echo plain text",
        "awk '{ print $1 }' file",  # braces that are not Jinja2
        "echo }} {{",  # the markers out of order still make a template ...
        "",
        "echo {# comment-like, yet plain text #}",
        "echo '{ {' $x",
    ],
)
def test_plain_text_fast_path(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cache: dict[str, Any] = {}
    monkeypatch.setattr(context, "_TEMPLATES", cache)
    if "{{" in text:
        # ... which is rendered (and here fails to parse), proving only plain text skips Jinja2.
        with pytest.raises(ComponentError):
            render_template(text, {})
        return
    assert render_template(text, {}) is text  # returned as is, not re-rendered
    assert cache == {}  # and never compiled


def test_compiled_templates_are_cached_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: dict[str, Any] = {}
    monkeypatch.setattr(context, "_TEMPLATES", cache)
    assert render_template("{{ a }}", {"a": 1}) == "1"
    first = cache["{{ a }}"]
    assert render_template("{{ a }}", {"a": 2}) == "2"
    assert cache["{{ a }}"] is first
    for i in range(600):
        render_template(f"{{{{ a }}}}{i}", {"a": 0})
    assert len(cache) <= 513


def _ctx(
    args: dict[str, Any],
    envs: dict[str, Any],
    query: dict[str, Any],
    job_vars: dict[str, Any] | None = None,
) -> JobContext:
    agent = SimpleNamespace(
        identity="node0",
        cache=SimpleNamespace(sections={"args": args, "envs": envs, "query": query}),
    )
    job = {"id": "j1", "timeout": 7, "vars": job_vars or {}, "files": []}
    return JobContext(agent, job)  # type: ignore[arg-type]


def test_context_render_uses_args_query_and_vars_with_vars_winning() -> None:
    ctx = _ctx({"who": "args", "port": 80}, {}, {"node1": {"ip": "10.1"}}, {"who": "vars"})
    assert ctx.render("{{ who }}:{{ port }}:{{ query.node1.ip }}") == "vars:80:10.1"
    assert ctx.timeout == 7.0 and ctx.identity == "node0" and ctx.job_id == "j1"


def test_context_sees_cache_updates_made_during_the_job() -> None:
    args: dict[str, Any] = {}
    ctx = _ctx(args, {}, {})
    args["later"] = "x"  # the context shares the live cache sections
    assert ctx.render("{{ later }}") == "x"


def test_context_environment_adds_cached_envs_as_text() -> None:
    # The executor encodes the agent's environment once; pytest itself changes
    # PYTEST_CURRENT_TEST between tests, so that one variable is left out.
    volatile = b"PYTEST_CURRENT_TEST"
    got = {k: v for k, v in _ctx({}, {}, {}).environment().items() if k != volatile}
    assert got == {k: v for k, v in os.environb.items() if k != volatile}
    env = _ctx({}, {"PORT": 8080, "NAME": "wéb"}, {}).environment()
    assert env[b"PORT"] == b"8080" and env[b"NAME"] == "wéb".encode()
    assert all(env[k] == v for k, v in os.environb.items() if k not in (b"PORT", b"NAME"))
