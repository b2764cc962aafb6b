"""Orchestration YAML: composed nodes into the normalised form, keeping file and line.

Apart from :mod:`directord.orchestration` so that only what reads orchestration
text imports yaml: ``directord exec`` checks and submits jobs without it.
"""

from __future__ import annotations

from typing import Any

import yaml

from directord.errors import OrchestrationError

# libyaml's loader when PyYAML was built with it: the pure-Python one costs
# about 0.2 ms a job, most of what the CLI spent on a large orchestration.
_Loader: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
ITEM_KEYS = {"jobs", "targets", "async", "name"}
JOB_KEYS = {"vars", "name", "assign"}


class Walker:
    """Turns composed YAML nodes into normalised orchestrations, keeping lines."""

    def __init__(self, text: str, source: str) -> None:
        self.source = source
        self.loader = _Loader(text)

    def err(self, node: yaml.Node | None, message: str) -> OrchestrationError:
        line = node.start_mark.line + 1 if node is not None else None
        return OrchestrationError(message, path=self.source, line=line)

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)

    def strings(self, node: yaml.Node, what: str) -> list[str]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.err(node, f"{what} must be a list of node names")
        out = []
        for item in node.value:
            value = self.value(item)
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise self.err(item, f"{what} entries must be node names")
            out.append(str(value))
        return out

    def load(self) -> list[dict[str, Any]]:
        try:
            root = self.loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            raise OrchestrationError(
                f"YAML error: {exc.problem or exc.context}",
                path=self.source,
                line=mark.line + 1 if mark else None,
            ) from None
        except yaml.YAMLError as exc:
            raise OrchestrationError(f"YAML error: {exc}", path=self.source) from None
        finally:
            self.loader.dispose()
        if root is None:
            raise OrchestrationError("empty orchestration file", path=self.source)
        if not isinstance(root, yaml.SequenceNode):
            raise self.err(root, "an orchestration file is a list of items with `jobs`")
        return [self.item(node) for node in root.value]

    def item(self, node: yaml.Node) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, "each orchestration must be a mapping with `jobs`")
        out: dict[str, Any] = {
            "name": "",
            "targets": [],
            "async": False,
            "source": self.source,
            "line": node.start_mark.line + 1,
            "jobs": None,
        }
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key not in ITEM_KEYS:
                raise self.err(
                    key_node,
                    f"unknown key {key!r} (expected one of {', '.join(sorted(ITEM_KEYS))})",
                )
            if key == "jobs":
                if not isinstance(value_node, yaml.SequenceNode) or not value_node.value:
                    raise self.err(value_node, "`jobs` must be a non-empty list")
                out["jobs"] = [self.job(j) for j in value_node.value]
            elif key == "targets":
                out["targets"] = self.strings(value_node, "targets")
            elif key == "async":
                value = self.value(value_node)
                if not isinstance(value, bool):
                    raise self.err(value_node, "`async` must be true or false")
                out["async"] = value
            else:
                out["name"] = str(self.value(value_node) or "")
        if out["jobs"] is None:
            raise self.err(node, "orchestration has no `jobs`")
        return out

    def job(self, node: yaml.Node) -> dict[str, Any]:
        if not isinstance(node, yaml.MappingNode):
            raise self.err(node, 'a job must be a mapping like `RUN: "command"`')
        job: dict[str, Any] = {
            "vars": {},
            "name": "",
            "assign": [],
            "line": node.start_mark.line + 1,
        }
        verbs = []
        for key_node, value_node in node.value:
            key = self.value(key_node)
            if key == "vars":
                if not isinstance(value_node, yaml.MappingNode):
                    raise self.err(value_node, "`vars` must be a mapping")
                job["vars"] = self.value(value_node)
            elif key == "name":
                job["name"] = str(self.value(value_node) or "")
            elif key == "assign":
                job["assign"] = self.strings(value_node, "assign")
            else:
                if not isinstance(value_node, yaml.ScalarNode):
                    raise self.err(value_node, f"the arguments of {key} must be a string")
                # The text as written: YAML must not turn `yes` into True or 0x10 into 16.
                args = value_node.value if self.value(value_node) is not None else ""
                verbs.append((str(key), args, key_node))
        if len(verbs) != 1:
            raise self.err(
                node,
                f"a job needs exactly one verb, found {len(verbs)}"
                + (f" ({', '.join(v[0] for v in verbs)})" if verbs else ""),
            )
        job["verb"], job["args"], _ = verbs[0]
        return job
