"""Template rendering on the node (Jinja2 sandbox, StrictUndefined), the taint of values
from other nodes (``query``), and the job context's values."""

from __future__ import annotations

import json
import os
import shlex
from types import SimpleNamespace
from typing import Any

import pytest

from directord.agent import templates
from directord.agent.context import JobContext
from directord.agent.templates import render_template, unsafe_reason
from directord.errors import ComponentError, UntrustedValueError
from directord.protocol import Job


def test_renders_values_filters_and_loops() -> None:
    text = "{{ name }}-{{ n + 1 }} {{ items | join(',') }}{% for i in items %}[{{ i }}]{% endfor %}"
    assert render_template(text, {"name": "web", "n": 1, "items": ["a", "b"]}) == (
        "web-2 a,b[a][b]"
    )


def test_nested_values_and_trailing_newline_kept() -> None:
    text = "{{ query['node0']['ip'] }}\n"
    assert render_template(text, {}, query={"node0": {"ip": "10.0.0.1"}}) == "10.0.0.1\n"


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
    monkeypatch.setattr(templates, "_TEMPLATES", cache)
    if "{{" in text:
        # ... which is rendered (and here fails to parse), proving only plain text skips Jinja2.
        with pytest.raises(ComponentError):
            render_template(text, {})
        return
    assert render_template(text, {}) is text  # returned as is, not re-rendered
    assert cache == {}  # and never compiled


def test_compiled_templates_are_cached_and_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    cache: dict[str, Any] = {}
    monkeypatch.setattr(templates, "_TEMPLATES", cache)
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
    cache = SimpleNamespace(sections={"args": args, "envs": envs, "query": query})
    job = Job(
        id="j1", parent="", lane="", verb="RUN", sha="s", options={}, timeout=7, vars=job_vars or {}
    )
    return JobContext(job, "node0", cache, None, lambda _: None)  # type: ignore[arg-type]


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


# ---- values from other nodes (query) are untrusted ----------------------------------------

ATTACK = "$(id -un > pwned)"
QUERY: dict[str, Any] = {
    "web2": {
        "headline": ATTACK,
        "role": "db",
        "b64": "aGVsbG8gd29ybGQ=",
        "host": "web2.example.com",
        "ip": "10.0.0.2",
        "csv": "a,b,c",
        "port": 8080,
        "neg": -1,
        "empty": "",
        "none": None,
        "facts": {"os": "debian", "bad;key": "x", "tags": ["a", "b c"], "origin": "here"},
    },
    "web1": {"role": "web"},
}
V = "query['web2']['headline']"


def render(text: str, **values: Any) -> str:
    return render_template(text, values, query=QUERY)


def refused(text: str, **values: Any) -> UntrustedValueError:
    with pytest.raises(UntrustedValueError) as info:
        render(text, **values)
    return info.value


@pytest.mark.parametrize(
    "text",
    ["", "web2", "10.0.0.2", "fe80::1", "aGVsbG8gd29ybGQ=", "a+b/c=", "user@host:/p,x.y_z%2-"],
)
def test_safe_text(text: str) -> None:
    assert unsafe_reason(text) is None


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("-rf", "starts with '-'"),
        ("--output=/etc/passwd", "starts with '-'"),
        ("a b", "holds ' '"),
        ("a\tb", "holds '\\t'"),
        ("a\nb", "holds '\\n'"),
        ("$HOME", "holds '$'"),
        ("`id`", "holds '`'"),
        ("x;y", "holds ';'"),
        ("x|y", "holds '|'"),
        ("x&y", "holds '&'"),
        ("x'y", 'holds "\'"'),
        ('x"y', "holds '\"'"),
        ("x\\y", "holds '\\\\'"),
        ("*", "holds '*'"),
        ("?", "holds '?'"),
        ("~root", "holds '~'"),
        ("#", "holds '#'"),
        ("!", "holds '!'"),
        ("(x)", "holds '('"),
        ("<x", "holds '<'"),
        ("{a,b}", "holds '{'"),
        ("[ab]", "holds '['"),
        ("wéb", "holds '\\xe9'"),
    ],
)
def test_unsafe_text_and_why(text: str, reason: str) -> None:
    assert unsafe_reason(text) == reason


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("b64", "aGVsbG8gd29ybGQ="),
        ("host", "web2.example.com"),
        ("ip", "10.0.0.2"),
        ("port", "8080"),
        ("role", "db"),
        ("empty", ""),
        ("none", "None"),
    ],
)
def test_safe_untrusted_values_render_unchanged(key: str, expected: str) -> None:
    assert render(f"x={{{{ query['web2']['{key}'] }}}}") == f"x={expected}"


def test_unsafe_untrusted_value_fails_naming_node_key_and_fix() -> None:
    error = refused(f'echo "{{{{ {V} }}}}"')
    assert isinstance(error, ComponentError)
    assert (error.node, error.key, error.reason) == ("web2", "headline", "holds '$'")
    assert str(error) == (
        "untrusted value from node 'web2', query key 'headline', holds '$': "
        "render it with '| quote', or with '| trust' if you are sure it is safe"
    )


def test_untrusted_value_starting_with_a_dash_is_refused() -> None:
    assert refused("rm {{ query.web2.neg }}").reason == "starts with '-'"
    assert refused("ls {{ query.web2.csv.replace('a', '-a') }}").reason == "starts with '-'"


def test_error_message_is_one_line_whatever_the_names_hold() -> None:
    error = UntrustedValueError("node\nx", "key\r\ny", "holds ';'")
    assert "\n" not in str(error) and "\r" not in str(error)
    assert "'node\\nx'" in str(error) and "'key\\r\\ny'" in str(error)


@pytest.mark.parametrize(
    "text",
    [
        "{{ V ~ 'x' }}",
        "{{ 'x' ~ V }}",
        "{{ V + 'x' }}",
        "{{ 'x' + V }}",
        "{{ V + query.web1.role }}",
        "{{ query.web1.role + V }}",
        "{{ V * 2 }}",
        "{{ V | upper }}",
        "{{ V | lower | trim }}",
        "{{ V | string }}",
        "{{ V | safe }}",
        "{{ V | e }}",
        "{{ V | default('x') }}",
        "{{ missing | default(V) }}",
        "{{ V | replace('$', '') }}",
        "{{ V | replace('x', 'y') }}",
        "{{ V | first }}",
        "{{ V | reverse }}",
        "{{ V | list }}",
        "{{ V | format }}",
        "{{ '%s' | format(V) }}",
        "{{ V | tojson }}",
        "{{ V | pprint }}",
        "{{ V | truncate(40) }}",
        "{{ V | attr('upper') }}",
        "{{ ['a', 'b'] | join(V) }}",
        "{{ V.split(' ')[0] }}",
        "{{ V.split(' ') | join('_') }}",
        "{{ V.upper() }}",
        "{{ V.strip().lower() }}",
        "{{ V.partition(' ')[0] }}",
        "{{ 'x'.join(V.split(' ')) if false else V.replace(' ', '_') }}",
        "{{ V[0] }}",
        "{{ V[:3] }}",
        "{% for x in V %}{{ x }}{% endfor %}",
        "{% set y = V %}{{ y }}",
        "{% set y %}{{ V }}{% endset %}{{ y }}",
        "{% set ns = namespace(v=V) %}{{ ns.v }}",
        "{% macro m(x) %}{{ x }}{% endmacro %}{{ m(V) }}",
        "{% filter upper %}{{ V }}{% endfilter %}",
        "{{ '%s' % V }}",
        "{{ '%r' % V }}",
        "{{ '{}'.format(V) }}",
        "{{ '{!r}'.format(V) }}",
        "{{ [V] | join(',') }}",
        "{{ [V] | map('upper') | join(',') }}",
        "{{ [V] | string }}",
        "{{ [V] }}",
        "{{ dict(a=V) }}",
        "{{ (V, 1) }}",
    ],
)
def test_laundering_routes_keep_the_taint_or_fail_closed(text: str) -> None:
    error = refused(text.replace("V", V))
    assert (error.node, error.key) == ("web2", "headline")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{{ query.web2.role ~ '-x' }}", "db-x"),
        ("{{ query.web2.role + query.web1.role }}", "dbweb"),
        ("{{ query.web2.role | upper }}", "DB"),
        ("{{ query.web2.role.upper() }}", "DB"),
        ("{{ query.web2.csv.split(',')[1] }}", "b"),
        ("{{ query.web2.csv.split(',') | join(' ') }}", "a b c"),
        ("{{ query.web2.csv | replace(',', ':') }}", "a:b:c"),
        ("{{ '%s-%s' | format(query.web2.role, 'x') }}", "db-x"),
        ("{% for x in query.web2.csv.split(',') %}[{{ x }}]{% endfor %}", "[a][b][c]"),
        ("{% set y = query.web2.role %}{{ y }}", "db"),
        ("{{ '%s' % query.web2.role }}", "db"),
        ("{{ query.web2.port + 1 }}", "8081"),
        ("{{ query.web2.port // 1000 * 2 }}", "16"),
        ("{{ query.web2.role * 2 }}", "dbdb"),
        ("{{ range(query.web2.csv | length) | list | length }}", "5"),
    ],
)
def test_operations_on_safe_untrusted_values_work(text: str, expected: str) -> None:
    assert render(text) == expected


def test_a_filter_result_stays_tracked_even_from_a_safe_value() -> None:
    # wordwrap puts newlines (command separators) between parts of the node's text.
    assert refused("echo {{ query.web2.b64 | wordwrap(4) }}").reason == "holds '\\n'"
    assert refused("echo {{ query.web2.role | center(6) }}").key == "role"
    assert render("echo {{ query.web2.role | center(6) | quote }}") == "echo '  db  '"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{% if query.web2.role == 'db' %}db{% else %}other{% endif %}", "db"),
        ("{% if 'db' == query.web2.role %}db{% endif %}", "db"),
        ("{{ query.web2.role != 'web' }}", "True"),
        ("{{ query.web2.headline | length }}", str(len(ATTACK))),
        ("{{ '$' in query.web2.headline }}", "True"),
        ("{{ query.web2.role in ['db', 'web'] }}", "True"),
        ("{{ 'role' in query.web1 }}", "True"),
        ("{{ 'web1' in query }}", "True"),
        ("{{ query | sort | join(' ') }}", "web1 web2"),
        ("{{ query | length }}", "2"),
        (
            "{% for n in query | sort %}{{ n }}={{ query[n].role }} {% endfor %}",
            "web1=web web2=db ",
        ),
        (
            "{% for n, v in query | dictsort %}{{ n }}={{ v.role }} {% endfor %}",
            "web1=web web2=db ",
        ),
        ("{{ query.get('web1').role }}", "web"),
        ("{{ query.get('web9', 'none') }}", "none"),
        ("{{ query.web2.get('role') }}", "db"),
        ("{{ query.web2.get('nope', 'dflt') }}", "dflt"),
        ("{{ query.web2.headline is string }}", "True"),
        ("{{ query.web2.port is number }}", "True"),
        ("{{ query.web2.facts is mapping }}", "True"),
        ("{{ query.web2.port > 80 }}", "True"),
        ("{{ query.web2.facts.tags | length }}", "2"),
    ],
)
def test_comparisons_length_in_iteration_and_get_work(text: str, expected: str) -> None:
    assert render(text) == expected


def test_quote_gives_one_shell_word_of_the_raw_value() -> None:
    quoted = render(f"{{{{ {V} | quote }}}}")
    assert quoted == shlex.quote(ATTACK) and shlex.split(quoted) == [ATTACK]
    assert render(f'echo "x:" {{{{ {V} | quote }}}}') == f'echo "x:" {shlex.quote(ATTACK)}'
    assert render("{{ query.web2.role | quote }}") == "db"  # safe text is left as is
    assert render("{{ query.web2.empty | quote }}") == "''"
    assert render("{{ query.web2.port | quote }}") == "8080"
    assert render("{{ name | quote }}", name="a b") == "'a b'"  # trusted values too
    assert render("{{ query.web2.headline.split(' ') | map('quote') | join(' ') }}") == (
        " ".join(shlex.quote(w) for w in ATTACK.split(" "))
    )


def test_quote_of_a_mapping_or_list_is_its_json() -> None:
    facts = QUERY["web2"]["facts"]
    assert render("{{ query.web2.facts | quote }}") == shlex.quote(json.dumps(facts))
    assert render("{{ query.web2.facts.tags | quote }}") == shlex.quote('["a", "b c"]')
    assert shlex.split(render("{{ query | quote }}")) == [json.dumps(QUERY)]


def test_quote_of_an_undefined_name_fails() -> None:
    with pytest.raises(ComponentError, match="'nope' is undefined"):
        render("{{ nope | quote }}")


def test_trust_gives_the_raw_value_unwrapped_recursively() -> None:
    assert render(f"echo {{{{ {V} | trust }}}}") == f"echo {ATTACK}"
    assert render("{{ (query.web2.facts | trust).tags[1] }}") == "b c"
    assert render("{{ query.web2.facts | trust }}") == json.dumps(QUERY["web2"]["facts"])
    assert render("{{ query | trust }}") == json.dumps(QUERY)
    assert render(f"{{{{ [{V}] | trust | join(',') }}}}") == ATTACK


def test_mappings_and_lists_render_as_json() -> None:
    assert render("{{ query.web1 }}") == '{"role": "web"}'
    assert render("{{ query['web1'] }}") == '{"role": "web"}'
    assert render("{{ query.web2.facts.tags[0:1] }}") == '["a"]'
    assert render("{{ items }}", items=["nginx", 1, None, True]) == '["nginx", 1, null, true]'
    safe = {"n1": {"ip": "10.0.0.1", "tags": ["a", "b"]}, "n2": {"ip": "10.0.0.2"}}
    assert render_template("{{ query }}", {}, query=safe) == json.dumps(safe)
    assert render_template("{{ query | tojson }}", {}, query=safe) == json.dumps(safe)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("{{ query }}", "headline"),
        ("{{ query['web2'] }}", "headline"),
        ("{{ query.web2 | tojson }}", "headline"),
        ("{{ query.web2 ~ '' }}", "headline"),
        ("{{ query.web2.facts }}", "facts"),  # the key 'bad;key' inside
        ("{{ query.web2.facts.tags }}", "facts"),  # the value 'b c' inside
    ],
)
def test_json_of_a_mapping_holding_unsafe_text_fails(text: str, key: str) -> None:
    error = refused(text)
    assert (error.node, error.key) == ("web2", key)


def test_nested_values_and_their_keys_are_untrusted() -> None:
    assert render("{{ query.web2.facts.os }}") == "debian"
    assert render("{{ query.web2.facts.origin }}") == "here"  # no proxy attribute hides a key
    assert render("{{ query.web2.facts['bad;key'] }}") == "x"  # the value itself is safe
    assert render("{{ query.web2.facts.tags[0] }}") == "a"
    assert refused("{{ query.web2.facts.tags[1] }}").reason == "holds ' '"
    assert refused("{% for k in query.web2.facts %}{{ k }} {% endfor %}").reason == "holds ';'"
    assert refused("{% for k, v in query.web2.facts.items() %}{{ k }}{% endfor %}").key == "facts"
    assert refused("{{ query.web2.facts | dictsort | first | first }}").key == "facts"
    assert render("{{ query.web2.facts.tags | map('quote') | join(' ') }}") == "a 'b c'"


@pytest.mark.parametrize(
    "text",
    [
        "{{ ''.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ query.__class__ }}",
        "{{ query.web2.role.__class__ }}",
        "{{ query.web2.role._value }}",
        "{{ query.web2.headline.raw() }}",
        "{{ query.web2.headline._origin() }}",
        "{{ query.web2.facts.__init__.__globals__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ lipsum.__globals__['os'] }}",
        "{{ query.web2.role.format(1) }}",  # an untrusted format string is no method here
        "{{ (query.web2.role | attr('format'))(1) }}",
    ],
)
def test_sandbox_refuses_escapes(text: str) -> None:
    with pytest.raises(ComponentError, match="template error: ") as info:
        render(text)
    assert not isinstance(info.value, UntrustedValueError)


def test_sandbox_refuses_to_change_the_live_cache() -> None:
    items = ["a"]
    with pytest.raises(ComponentError, match="unsafe"):
        render("{{ items.append('b') }}", items=items)
    with pytest.raises(ComponentError, match="template error: "):
        render("{{ query.web2.facts.tags.append('x') }}")
    assert items == ["a"] and QUERY["web2"]["facts"]["tags"] == ["a", "b c"]


def test_context_render_fails_on_a_query_value_and_passes_it_quoted() -> None:
    ctx = _ctx({"query": "shadow"}, {}, {"node1": {"k": "a;b"}}, {"mine": "x y"})
    with pytest.raises(UntrustedValueError) as info:
        ctx.render("echo {{ query.node1.k }}")
    assert (info.value.node, info.value.key) == ("node1", "k")
    # The node's own args and the job's vars are trusted; `query` is always the section.
    assert ctx.render("echo {{ query.node1.k | quote }} {{ mine }}") == "echo 'a;b' x y"
