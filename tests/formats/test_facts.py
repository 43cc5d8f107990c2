"""lowbit.formats.facts (the torch-free table ``lowbit formats`` prints) equals the registries."""

import pytest

from lowbit import formats
from lowbit.core.blocks import block_format_names, get_block_format
from lowbit.formats import facts


def _live_elements() -> list[tuple]:
    rows = []
    for n in formats.names():
        f = formats.get(n)
        d = {**f.as_dict(), "kind": f.kind, "bias": getattr(f, "bias", None),
             "nan": getattr(f, "nan", None)}
        rows.append(tuple(d[k] for k in facts.ELEMENT_FIELDS))
    return rows


def _live_blocks() -> list[tuple]:
    rows = []
    for n in block_format_names():
        b = get_block_format(n)
        rows.append((b.name, b.element, b.block_size, b.scale_format, b.global_scale,
                     b.bits_per_value))
    return rows


@pytest.mark.parametrize("static,live,what", [
    (lambda: [tuple(r.values()) for r in facts.element_formats()], _live_elements, "_ELEMENTS"),
    (lambda: [tuple(r.values()) for r in facts.block_formats()], _live_blocks, "_BLOCKS"),
])
def test_facts_equal_the_registries(static, live, what):
    want = live()
    got = static()
    paste = "\n".join(f"    {r!r}," for r in want)
    assert got == want, f"lowbit/formats/facts.py {what} is stale; replace its rows with:\n{paste}"
    for g, w in zip(got, want):  # equal floats, not only equal repr: exact to the bit
        assert all(type(a) is type(b) for a, b in zip(g, w)), (g, w)
