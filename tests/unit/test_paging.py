"""Pages of an API answer: whole items, bounded in bytes and count, none lost."""

from __future__ import annotations

import pytest

from directord.errors import ConfigError
from directord.server import paging
from directord.server.paging import in_pages, start_of, take_page


def items(count: int, size: int = 10) -> list[dict[str, str]]:
    return [{"i": f"{i:04d}" + "x" * size} for i in range(count)]


def test_a_page_stops_at_its_item_count_and_says_where_the_next_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(paging, "PAGE_ITEMS", 3)
    page, next_page = take_page((10 + i, item) for i, item in enumerate(items(5)))
    assert [p["i"][:4] for p in page] == ["0000", "0001", "0002"]
    assert next_page == 13  # the position of the first item left out
    assert take_page((i, item) for i, item in enumerate(items(3))) == (items(3), None)


def test_a_page_stops_at_its_byte_budget_but_always_holds_one_item(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(paging, "PAGE_BYTES", 250)
    page, next_page = take_page(enumerate(items(10, size=100)))
    assert len(page) == 2 and next_page == 2
    huge = items(2, size=10_000)
    page, next_page = take_page(enumerate(huge))
    assert page == huge[:1] and next_page == 1


def test_in_pages_keeps_every_item_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(paging, "PAGE_ITEMS", 4)
    every = items(10)
    pages = list(in_pages(every))
    assert [len(p) for p in pages] == [4, 4, 2]
    assert [item for p in pages for item in p] == every
    assert list(in_pages([])) == []


@pytest.mark.parametrize("value", [-1, "3", 2.0, True, None])
def test_a_page_start_is_an_integer_from_zero(value: object) -> None:
    with pytest.raises(ConfigError, match=r"from: expected an integer >= 0") as info:
        start_of({"from": value})
    assert info.value.key == "from"
    assert start_of({"from": 7}) == 7
