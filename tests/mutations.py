"""Requests with one thing wrong: a valid request with one value replaced by an edge value
or junk, removed, or an unknown one added. Property tests of bad input draw from here."""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

EDGE_VALUES = st.sampled_from(
    [
        None,
        True,
        -1,
        0,
        1.5,
        2**64,
        2**256,
        2**256 - 1,
        "",
        "0x",
        "0x0",
        "0x00",
        "0X1",
        "0xzz",
        "1",
        " 0x1",
        "0x" + "f" * 65,
        "0x" + "00" * 32,
        [],
        {},
        {"hex": "0x00"},
        "é",
    ]
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=5,
)
JUNK = st.one_of(EDGE_VALUES, JSON_VALUES)


def paths_of(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a JSON value where one thing can go wrong (``()`` is the whole)."""
    found: list[tuple[Any, ...]] = [prefix]
    if isinstance(value, dict):
        for name, inner in value.items():
            found += paths_of(inner, (*prefix, name))
    elif isinstance(value, list):
        for index, inner in enumerate(value):
            found += paths_of(inner, (*prefix, index))
    return found


NAMES = st.text(min_size=1, max_size=6)
LONE_SURROGATE = "\ud800"
"""Text JSON can carry (escaped) and UTF-8 cannot: for the JSON readers' bad input."""
JUNK_TEXT = st.one_of(JUNK, st.sampled_from([LONE_SURROGATE, "a\udfff", "\udc00\ud800"]))
NAMES_TEXT = st.one_of(NAMES, st.just(LONE_SURROGATE))


@st.composite
def one_thing_wrong(
    draw: st.DrawFn,
    valid: Any,
    junk: st.SearchStrategy[Any] = JUNK,
    names: st.SearchStrategy[str] = NAMES,
) -> Any:
    """``valid`` unchanged, or with one value replaced (by ``junk``), removed, or an unknown
    one added (named from ``names``)."""
    body = copy.deepcopy(valid)
    how = draw(st.sampled_from(["as is", "replace", "replace", "replace", "remove", "add"]))
    if how == "as is":
        return body
    path = draw(st.sampled_from(paths_of(body)))
    if not path:
        return draw(junk) if how == "replace" else body
    *outer, last = path
    parent = body
    for step in outer:
        parent = parent[step]
    if how == "replace":
        parent[last] = draw(junk)
    elif how == "remove":
        del parent[last]
    elif isinstance(parent, dict):
        parent[draw(names)] = draw(junk)
    else:
        parent.append(draw(junk))
    return body
