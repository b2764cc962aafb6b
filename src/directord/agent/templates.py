"""Template rendering on the node: Jinja2's sandbox, and the taint of values from other nodes.

A job's text (a RUN command, a path, a blueprint ...) is rendered here just before
the job runs. Names come from the node's own cache (trusted: the operator put them
there) and from the ``query`` section, which holds what *other nodes* reported:
``query[NODE][KEY]``. NODE is an identity the server checked and KEY comes from the
operator's QUERY job, so both are trusted; the value below them, keys of nested
mappings included, is not.

Untrusted values reach the template wrapped in proxies that remember the node and key
they came from. A proxy turns into text only when the text is *safe*: the characters
``A-Za-z0-9_@%+=:,./-``, not starting with ``-``; anything else raises
:class:`UntrustedValueError`, which fails the job. Two ways through: the ``quote``
filter (``shlex.quote`` of the raw value, or of its JSON for a mapping or list) and the
``trust`` filter (the raw value, unwrapped recursively).

How taint survives what a template does with a value:

* conversion to text (``~``, ``%``, ``format``, a filter that calls ``str``) applies
  the rule, so whatever comes out is either safe or an error;
* operators (``+``, ``*``, comparisons, ``in``, indexing, iteration) and a whitelist of
  str methods work on the raw value and wrap what they return again;
* every built-in filter gets the raw value of an untrusted scalar and its result is
  wrapped again (``v | upper`` stays untrusted); untrusted mappings and lists are handed
  to filters as proxies, so what they iterate stays wrapped one element at a time;
* rendering a mapping or a list (``{{ query }}``) renders JSON, under the same rule.

The sandbox is :class:`jinja2.sandbox.ImmutableSandboxedEnvironment`: besides refusing
``__class__``-style escapes, it refuses methods that change a list or dict, because
the args and query mappings a template sees are the node's live cache sections.
"""

from __future__ import annotations

import functools
import json
import operator
import re
import shlex
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from directord.errors import ComponentError, UntrustedValueError

_UNSAFE_CHAR = re.compile(r"[^A-Za-z0-9_@%+=:,./-]")
_CACHE_LIMIT = 512

# str methods a template may call on an untrusted string; each result is wrapped
# again. format and format_map are left out: the sandbox checks format strings only
# for str's own methods, and an untrusted format string could reach attributes.
_STR_METHODS = frozenset(
    {
        "capitalize",
        "casefold",
        "center",
        "count",
        "endswith",
        "expandtabs",
        "find",
        "index",
        "isalnum",
        "isalpha",
        "isascii",
        "isdecimal",
        "isdigit",
        "isidentifier",
        "islower",
        "isnumeric",
        "isprintable",
        "isspace",
        "istitle",
        "isupper",
        "join",
        "ljust",
        "lower",
        "lstrip",
        "partition",
        "removeprefix",
        "removesuffix",
        "replace",
        "rfind",
        "rindex",
        "rjust",
        "rpartition",
        "rsplit",
        "rstrip",
        "split",
        "splitlines",
        "startswith",
        "strip",
        "swapcase",
        "title",
        "upper",
        "zfill",
    }
)


def unsafe_reason(text: str) -> str | None:
    """Why ``text`` is unsafe in a shell command, or None when it is safe."""
    if text.startswith("-"):
        return "starts with '-'"
    bad = _UNSAFE_CHAR.search(text)
    if bad is None:
        return None
    return f"holds {bad.group()!a}"


def _text(raw: Any) -> str:
    return raw if type(raw) is str else str(raw)


class Untrusted:
    """Base of the proxies around values from other nodes: the raw value and its origin."""

    __slots__ = ("_key", "_node", "_value")

    def __init__(self, value: Any, node: str, key: str) -> None:
        self._value = value
        self._node = node
        self._key = key

    # No public attribute here: a template could read it (a `raw()` would launder the
    # value), and on a mapping it would hide the key of the same name.
    def _origin(self) -> tuple[str, str]:
        return self._node, self._key

    def __bool__(self) -> bool:
        return bool(self._value)

    def __len__(self) -> int:
        return len(self._value)

    def __contains__(self, item: object) -> bool:
        return _unwrap(item) in self._value

    def __str__(self) -> str:
        return json.dumps(_plain(self), ensure_ascii=False, default=str)

    def __repr__(self) -> str:
        return repr(_plain(self))

    def __format__(self, spec: str) -> str:
        return format(str(self), spec)


def _binary(op: Callable[[Any, Any], Any], *, reflected: bool = False) -> Any:
    """A dunder method applying ``op`` to the raw values and wrapping the result."""

    def method(self: UntrustedValue, other: Any) -> Any:
        left, right = (_unwrap(other), self._value) if reflected else (self._value, _unwrap(other))
        return _wrap(op(left, right), *_blame(self, other))

    return method


def _unary(op: Callable[[Any], Any]) -> Any:
    def method(self: UntrustedValue) -> Any:
        return _wrap(op(self._value), self._node, self._key)

    return method


class UntrustedValue(Untrusted):
    """An untrusted scalar: a string, a number, or whatever else an operation produced."""

    __slots__ = ()

    def __str__(self) -> str:
        text = _text(self._value)
        reason = unsafe_reason(text)
        if reason is not None:
            raise UntrustedValueError(self._node, self._key, reason)
        return text

    def __repr__(self) -> str:
        str(self)
        return repr(self._value)

    def __format__(self, spec: str) -> str:
        str(self)
        return format(self._value, spec)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # a missing slot, or a protocol probe: never a str method
            raise AttributeError(name)
        value = self._value
        if not isinstance(value, str) or name not in _STR_METHODS:
            raise AttributeError(name)
        method = getattr(value, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            result = method(*map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()})
            return _wrap(result, *_blame(self, *args, *kwargs.values()))

        return call

    def __eq__(self, other: object) -> bool:
        return bool(self._value == _unwrap(other))

    def __ne__(self, other: object) -> bool:
        return bool(self._value != _unwrap(other))

    def __lt__(self, other: object) -> bool:
        return bool(self._value < _unwrap(other))

    def __le__(self, other: object) -> bool:
        return bool(self._value <= _unwrap(other))

    def __gt__(self, other: object) -> bool:
        return bool(self._value > _unwrap(other))

    def __ge__(self, other: object) -> bool:
        return bool(self._value >= _unwrap(other))

    def __hash__(self) -> int:
        return hash(self._value)

    def __index__(self) -> int:
        # A count or a position carries no text of the node's into the output.
        if isinstance(self._value, int) and not isinstance(self._value, bool):
            return self._value
        raise TypeError(f"{type(self._value).__name__} value is not an integer")

    def __iter__(self) -> Iterator[Any]:
        return (_wrap(item, self._node, self._key) for item in self._value)

    def __getitem__(self, index: Any) -> Any:
        return _wrap(self._value[_unwrap(index)], self._node, self._key)

    __add__ = _binary(operator.add)
    __radd__ = _binary(operator.add, reflected=True)
    __sub__ = _binary(operator.sub)
    __rsub__ = _binary(operator.sub, reflected=True)
    __mul__ = _binary(operator.mul)
    __rmul__ = _binary(operator.mul, reflected=True)
    __truediv__ = _binary(operator.truediv)
    __rtruediv__ = _binary(operator.truediv, reflected=True)
    __floordiv__ = _binary(operator.floordiv)
    __rfloordiv__ = _binary(operator.floordiv, reflected=True)
    __mod__ = _binary(operator.mod)
    __rmod__ = _binary(operator.mod, reflected=True)
    __pow__ = _binary(operator.pow)
    __rpow__ = _binary(operator.pow, reflected=True)
    __neg__ = _unary(operator.neg)
    __pos__ = _unary(operator.pos)
    __abs__ = _unary(operator.abs)


class UntrustedMapping(Untrusted, Mapping[Any, Any]):
    """An untrusted mapping: its keys and values come out wrapped."""

    __slots__ = ()

    def __getitem__(self, key: Any) -> Any:
        return _wrap(self._value[_unwrap(key)], self._node, self._key)

    def __iter__(self) -> Iterator[Any]:
        return (_wrap(key, self._node, self._key) for key in self._value)

    def __eq__(self, other: object) -> bool:
        return bool(_raw(self) == _raw(other))

    __hash__ = None  # type: ignore[assignment]


class UntrustedList(Untrusted, Sequence[Any]):
    """An untrusted list (or tuple): its items come out wrapped."""

    __slots__ = ()

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return UntrustedList(self._value[index], self._node, self._key)
        return _wrap(self._value[_unwrap(index)], self._node, self._key)

    def __iter__(self) -> Iterator[Any]:
        return (_wrap(item, self._node, self._key) for item in self._value)

    def __eq__(self, other: object) -> bool:
        return bool(_raw(self) == _raw(other))

    def __add__(self, other: Any) -> UntrustedList:
        return UntrustedList([*self._value, *_unwrap(other)], *_blame(self, other))

    def __radd__(self, other: Any) -> UntrustedList:
        return UntrustedList([*_unwrap(other), *self._value], *_blame(self, other))

    __hash__ = None  # type: ignore[assignment]


class _View(Mapping[str, Any]):
    """Trusted top levels of the query section: names as they are, values wrapped."""

    __slots__ = ("_data",)

    def __init__(self, data: Mapping[str, Any]) -> None:
        self._data = data

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        return _unwrap(key) in self._data

    def __str__(self) -> str:
        return json.dumps(_plain(self), ensure_ascii=False, default=str)

    def __repr__(self) -> str:
        return repr(_plain(self))


class QueryView(_View):
    """``query``: node names, each leading to a :class:`NodeQueryView`."""

    __slots__ = ()

    def __getitem__(self, node: str) -> Any:
        node = _unwrap(node)
        values = self._data[node]
        if isinstance(values, Mapping):
            return NodeQueryView(node, values)
        return _wrap(values, str(node), "")


class NodeQueryView(_View):
    """``query[NODE]``: the QUERY keys, each leading to an untrusted value."""

    __slots__ = ("_node",)

    def __init__(self, node: str, data: Mapping[str, Any]) -> None:
        super().__init__(data)
        self._node = node

    def __getitem__(self, key: str) -> Any:
        key = _unwrap(key)
        return _wrap(self._data[key], str(self._node), str(key))


def _wrap(value: Any, node: str, key: str) -> Any:
    """``value`` as a proxy remembering ``node`` and ``key``; None and bools stay as they are."""
    if value is None or isinstance(value, bool | Untrusted):
        return value
    if isinstance(value, Mapping):
        return UntrustedMapping(value, node, key)
    if isinstance(value, list | tuple):
        return UntrustedList(value, node, key)
    if isinstance(value, Iterator):
        return (_wrap(item, node, key) for item in value)
    return UntrustedValue(value, node, key)


def _unwrap(value: Any) -> Any:
    """The raw value of a proxy, one level deep; anything else as it is."""
    return value._value if isinstance(value, Untrusted) else value


def _blame(*values: Any) -> tuple[str, str]:
    """The origin to report for a result built from ``values``: an unsafe one first."""
    tainted = [v for v in values if isinstance(v, Untrusted)]
    for value in tainted:
        if isinstance(value, UntrustedValue) and unsafe_reason(_text(value._value)):
            return value._origin()
    return tainted[0]._origin()


def _raw(value: Any) -> Any:
    """``value`` with every proxy inside replaced by its raw value (the ``trust`` filter)."""
    if isinstance(value, Untrusted):
        value = value._value
    if isinstance(value, Mapping):
        return {_raw(k): _raw(v) for k, v in value.items()}
    if isinstance(value, list | tuple | UntrustedList):
        return [_raw(v) for v in value]
    return value


def _json_key(key: Any) -> Any:
    key = _plain(key)
    return key if key is None or isinstance(key, str | int | float | bool) else str(key)


def _plain(value: Any) -> Any:
    """A JSON-ready copy of ``value``; every untrusted text inside must be safe.

    Raises:
        UntrustedValueError: an untrusted string inside is unsafe.
    """
    if isinstance(value, UntrustedValue):
        text = str(value)
        return value._value if isinstance(value._value, str | int | float) else text
    if isinstance(value, Mapping):
        return {_json_key(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | UntrustedList):
        return [_plain(v) for v in value]
    return value


def _to_json(value: Any, indent: int | None = None) -> str:
    """JSON of ``value`` (also the ``tojson`` filter); every untrusted text inside must be safe."""
    return json.dumps(_plain(value), ensure_ascii=False, default=str, indent=indent)


def _finalize(value: Any) -> Any:
    """What ``{{ ... }}`` prints: checked text for proxies, JSON for mappings and lists."""
    if isinstance(value, UntrustedValue):
        return str(value)
    if isinstance(value, Mapping | list | tuple | UntrustedList):
        return _to_json(value)
    return value


def quote(value: Any) -> str:
    """The ``quote`` filter: one shell word holding the raw value (JSON for collections)."""
    raw = _raw(value)
    if isinstance(raw, str):
        text = raw
    elif isinstance(raw, dict | list):
        text = json.dumps(raw, ensure_ascii=False, default=str)
    else:
        text = str(raw)  # an undefined name raises here, as anywhere else
    return shlex.quote(text)


def trust(value: Any) -> Any:
    """The ``trust`` filter: the raw value, every proxy inside unwrapped."""
    return _raw(value)


def _tracking_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a built-in filter: untrusted scalars go in raw and the result comes out wrapped.

    Untrusted mappings and lists go in as proxies: what the filter takes out of them
    stays wrapped, item by item, so ``v.split(',') | map('quote') | join(' ')`` works.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        tainted = [a for a in (*args, *kwargs.values()) if isinstance(a, UntrustedValue)]
        if not tainted:
            return func(*args, **kwargs)
        result = func(
            *(_unwrap_scalar(a) for a in args),
            **{k: _unwrap_scalar(v) for k, v in kwargs.items()},
        )
        return _wrap(result, *_blame(*tainted))

    return wrapper


def _unwrap_scalar(value: Any) -> Any:
    return value._value if isinstance(value, UntrustedValue) else value


def _raw_test(func: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a built-in test: it sees raw values (``v is string``); a test returns a bool."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return func(*map(_unwrap, args), **{k: _unwrap(v) for k, v in kwargs.items()})

    return wrapper


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters = {name: _tracking_filter(f) for name, f in env.filters.items()}
    env.tests = {name: _raw_test(f) for name, f in env.tests.items()}  # type: ignore[arg-type]
    env.filters.update(quote=quote, trust=trust, tojson=_to_json)
    return env


_JINJA = _environment()
_TEMPLATES: dict[str, jinja2.Template] = {}


def render_template(
    text: str, values: Mapping[str, Any], query: Mapping[str, Any] | None = None
) -> str:
    """Render Jinja2 ``text`` in the sandbox; plain text (no ``{{``/``{%``) is returned as is.

    Args:
        text: the template (a job's argument, a blueprint file ...).
        values: trusted names (the node's args, the job's vars, ``identity``).
        query: the node cache's query section; it is the name ``query``, over any
            ``query`` in ``values``, and what other nodes reported in it is untrusted.

    Returns:
        The rendered text.

    Raises:
        UntrustedValueError: an untrusted value would render as unsafe text.
        ComponentError: the template does not parse, names something undefined,
            or an expression in it fails.
    """
    if "{{" not in text and "{%" not in text:
        return text
    template = _TEMPLATES.get(text)
    if template is None:
        try:
            template = _JINJA.from_string(text)
        except jinja2.TemplateSyntaxError as exc:
            raise ComponentError(f"template error: {exc.message} (line {exc.lineno})") from None
        if len(_TEMPLATES) > _CACHE_LIMIT:
            _TEMPLATES.clear()
        _TEMPLATES[text] = template
    names = {**values, "query": QueryView(query if query is not None else {})}
    try:
        return template.render(names)
    except UntrustedValueError:
        raise
    except jinja2.UndefinedError as exc:
        raise ComponentError(f"template error: {exc.message}") from None
    except jinja2.TemplateError as exc:
        raise ComponentError(f"template error: {exc}") from None
    except Exception as exc:
        # An expression of the operator's template failed ({{ 1 / 0 }}, an operation a
        # proxy refuses): the job fails with the message, the agent carries on.
        raise ComponentError(f"template error: {exc}") from None
