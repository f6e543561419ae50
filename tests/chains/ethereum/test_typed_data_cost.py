"""EIP-712 documents made to be expensive cost time in proportion to their size.

Each shape is built at a small size and at ten times that size. A linear parser takes
about ten times as long for the larger one; a quadratic step takes about a hundred times
as long, and a 400 KB request then holds a signing thread for seconds. Only the two CPU
times are compared, each the best of a few runs with the garbage collector off (as
``timeit`` does), against a generous factor: nothing here depends on how fast the machine
is, and speed as such is measured in ``bench/``.
"""

from __future__ import annotations

import contextlib
import gc
import time
from collections.abc import Callable
from typing import Any

import pytest

from signd.chains.ethereum.typed_data import MAX_TYPE_ENCODING, typed_data_digest
from signd.errors import InvalidTypedData

SCALE = 10
GROWTH_ALLOWED = 3 * SCALE
"""The most the larger document may cost, in multiples of the smaller one's cost."""
RUNS = 3


def _document(types: dict[str, Any], primary: str, message: Any) -> dict[str, Any]:
    return {"types": types, "primaryType": primary, "domain": {"name": "x"}, "message": message}


def many_fields(n: int) -> dict[str, Any]:
    """One struct of ``n`` uint8 fields (each field was checked against all before it)."""
    fields = [{"name": f"f{i}", "type": "uint8"} for i in range(n)]
    return _document({"S": fields}, "S", {f"f{i}": 1 for i in range(n)})


def long_struct_name(n: int) -> dict[str, Any]:
    """A struct name of ``n`` characters with ``n // 10`` fields (its place in the types,
    ``types.SSS...[i]``, was spelled out for every field)."""
    name = "S" * n
    fields = [{"name": f"f{i}", "type": "bool"} for i in range(n // 10)]
    return _document({name: fields}, name, {f"f{i}": True for i in range(n // 10)})


def many_array_dimensions(n: int) -> dict[str, Any]:
    """A field of type ``uint8[][]...`` with ``n`` dimensions, and ``n`` empty arrays deep
    inside its value (the type was read again for each dimension and each item)."""
    value: list[Any] = [[] for _ in range(n)]
    for _ in range(50):
        value = [value]
    return _document({"S": [{"name": "a", "type": "uint8" + "[]" * n}]}, "S", {"a": value})


def many_struct_types(n: int) -> dict[str, Any]:
    """``n`` struct types that each use the next, all in the message: each one's
    ``encodeType`` holds every type after it, n²/2 definitions in all (refused past
    :data:`MAX_TYPE_ENCODING`)."""
    types = {f"T{i}": [{"name": "next", "type": f"T{i + 1}[]"}] for i in range(n)}
    types[f"T{n}"] = []
    types["All"] = [{"name": f"t{i}", "type": f"T{i}"} for i in range(n)]
    return _document(types, "All", {f"t{i}": {"next": []} for i in range(n)})


SHAPES: dict[str, tuple[Callable[[int], dict[str, Any]], int]] = {
    "many-fields": (many_fields, 2_000),
    "long-struct-name": (long_struct_name, 10_000),
    "many-array-dimensions": (many_array_dimensions, 8_000),
    "many-struct-types": (many_struct_types, 200),
}


def _cpu_seconds(document: dict[str, Any]) -> float:
    """The CPU time of one digest (or refusal) of ``document``, garbage collector off."""
    gc.collect()
    gc.disable()
    try:
        start = time.process_time()
        with contextlib.suppress(InvalidTypedData):
            typed_data_digest(document)
        return time.process_time() - start
    finally:
        gc.enable()


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_cost_grows_linearly_with_the_document(shape: str) -> None:
    build, size = SHAPES[shape]
    small, large = build(size), build(SCALE * size)
    small_cost = min(_cpu_seconds(small) for _ in range(RUNS))
    large_costs = []
    for _ in range(RUNS):  # one run within the limit is enough: noise only slows a run down
        large_costs.append(_cpu_seconds(large))
        if large_costs[-1] <= GROWTH_ALLOWED * small_cost:
            return
    growth = min(large_costs) / small_cost
    pytest.fail(
        f"{shape}: {SCALE}x the size took {growth:.0f}x the time ({GROWTH_ALLOWED}x allowed)"
    )


def test_twenty_thousand_fields_are_signed() -> None:
    assert len(typed_data_digest(many_fields(20_000))) == 32


def test_too_much_to_hash_for_the_types_is_refused() -> None:
    with pytest.raises(InvalidTypedData) as caught:
        typed_data_digest(many_struct_types(500))
    assert caught.value.field == "types"
    assert str(MAX_TYPE_ENCODING) in caught.value.message
