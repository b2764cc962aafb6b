"""README.md documents every configuration option (flag, config key, env var)."""

from __future__ import annotations

from pathlib import Path

import pytest

from directord.config import option_fields

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("name", [f.name for f in option_fields()])
def test_option_is_in_configuration_reference(name: str) -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    flag = "--" + name.replace("_", "-")
    row = next((line for line in section.splitlines() if line.startswith(f"| `{flag}` |")), None)
    assert row is not None, f"README.md's configuration table has no row for {flag}"
    assert f"`DIRECTORD_{name.upper()}`" in row
    if name != "config_file":
        assert f"`{name}`" in row


def test_every_verb_is_in_component_reference() -> None:
    from directord.components import known_verbs

    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Components", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    missing = [v for v in known_verbs() if not any(f"`{v}`" in row.split("|")[1] for row in rows)]
    assert missing == [], f"README.md's component table lacks {missing}"
