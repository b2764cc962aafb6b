"""The docs follow the code: README.md and docs/ (the mkdocs site) stay complete and linked.

- every configuration option has its row in docs/configuration.md (flag, config key, env var);
- every verb has its row in docs/components.md;
- every relative link in README.md and docs/*.md names a file (and a heading) that exists;
- mkdocs.yml's nav lists every page of docs/, and nothing in it fetches from the network;
- the threat model README.md shows is the one in docs/security.md.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from directord.config import option_fields

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MKDOCS = ROOT / "mkdocs.yml"

# [text](target) and ![alt](target), but not inside code spans or fenced blocks.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^\s*(```|~~~)")


def _section(path: Path, heading: str) -> str:
    """The text under `heading` (a whole line, e.g. '## Every option') up to the next '## '."""
    text = path.read_text(encoding="utf-8")
    marker = f"\n{heading}\n"
    assert marker in text, f"{path.name} has no '{heading}' section"
    return text.split(marker, 1)[1].split("\n## ", 1)[0]


def _unfenced_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks."""
    lines = []
    fenced = False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def _prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code spans blanked."""
    return [re.sub(r"`+[^`]*`+", "``", line) for line in _unfenced_lines(text)]


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading (mkdocs --strict checks its own rule on the site)."""
    text = re.sub(r"[`*_]", "", heading).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    anchors: set[str] = set()
    for line in _unfenced_lines(path.read_text(encoding="utf-8")):
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = _slug(match.group(1))
            slug, n = base, 0
            while slug in anchors:
                n += 1
                slug = f"{base}-{n}"
            anchors.add(slug)
    return anchors


def _doc_files() -> list[Path]:
    return sorted([README, *DOCS.glob("*.md")])


@pytest.mark.parametrize("name", [f.name for f in option_fields()])
def test_option_is_in_configuration_reference(name: str) -> None:
    section = _section(DOCS / "configuration.md", "## Every option")
    flag = "--" + name.replace("_", "-")
    row = next((line for line in section.splitlines() if line.startswith(f"| `{flag}` |")), None)
    assert row is not None, f"docs/configuration.md's configuration table has no row for {flag}"
    assert f"`DIRECTORD_{name.upper()}`" in row
    if name != "config_file":
        assert f"`{name}`" in row


def test_every_verb_is_in_component_reference() -> None:
    from directord.components import known_verbs

    section = _section(DOCS / "components.md", "## The verbs")
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    missing = [v for v in known_verbs() if not any(f"`{v}`" in row.split("|")[1] for row in rows)]
    assert missing == [], f"docs/components.md's component table lacks {missing}"


@pytest.mark.parametrize("path", _doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_and_headings_that_exist(path: Path) -> None:
    broken = []
    for line in _prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...
                continue
            file_part, _, anchor = target.partition("#")
            dest = (path.parent / file_part).resolve() if file_part else path
            if not dest.exists():
                broken.append(f"{target}: no file {dest.relative_to(ROOT)}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{target}: no heading #{anchor} in {dest.relative_to(ROOT)}")
    assert broken == [], f"{path.relative_to(ROOT)} has broken links: {broken}"


def _nav_pages(nav: Any) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, list):
        return [page for item in nav for page in _nav_pages(item)]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in _nav_pages(value)]
    return []


def _mkdocs() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))
    return config


def test_mkdocs_nav_lists_every_docs_page() -> None:
    nav = _nav_pages(_mkdocs()["nav"])
    pages = sorted(p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md"))
    assert sorted(set(nav)) == sorted(nav), f"mkdocs.yml's nav lists a page twice: {nav}"
    assert [p for p in pages if p not in nav] == [], "pages missing from mkdocs.yml's nav"
    assert [p for p in nav if p not in pages] == [], "mkdocs.yml's nav names missing pages"


def test_mkdocs_build_fetches_nothing() -> None:
    config = _mkdocs()
    assert config["theme"].get("font") is False, "theme.font must be false (no web fonts)"
    plugins = [next(iter(p)) if isinstance(p, dict) else p for p in config.get("plugins", [])]
    fetching = {"social", "privacy", "offline", "material/social", "material/privacy"}
    assert fetching.isdisjoint(plugins), f"plugins that fetch from the network: {plugins}"
    for key in ("extra_css", "extra_javascript"):
        remote = [u for u in config.get(key, []) if "//" in str(u)]
        assert remote == [], f"{key} loads from the network: {remote}"


def _table(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("| ")]


def test_readme_threat_model_is_the_security_page_one() -> None:
    readme = _table(_section(README, "## Security at a glance"))
    docs = _table(_section(DOCS / "security.md", "## Who can do what: the threat model"))
    assert readme, "README.md's 'Security at a glance' has no threat-model table"
    assert readme == docs, "README.md's threat model differs from docs/security.md's"
