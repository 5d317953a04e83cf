"""Head subsets: ``18.*,20.3`` names every head of layer 18 and head 3 of layer 20."""

from __future__ import annotations

from attnprog.errors import AttnProgError


def parse_heads(spec: str | None, n_layers: int, n_heads: int) -> list[int]:
    """Rows (layer * n_heads + head) named by ``spec``, sorted; every row when empty or None.

    Items are ``L.H``, ``L.*`` (a whole layer) or ``*.H`` (one head in every layer).
    """
    if not spec or spec.strip() in ("*", "all"):
        return list(range(n_layers * n_heads))
    rows: set[int] = set()
    for item in (part.strip() for part in spec.split(",")):
        layer, dot, head = item.partition(".")
        if not dot or not all(p == "*" or p.isdigit() for p in (layer, head)):
            raise AttnProgError(f"head {item!r} is not LAYER.HEAD, LAYER.* or *.HEAD (e.g. 18.*,20.3)")
        layers = range(n_layers) if layer == "*" else [int(layer)]
        heads = range(n_heads) if head == "*" else [int(head)]
        for number in layers:
            for index in heads:
                if number >= n_layers or index >= n_heads:
                    raise AttnProgError(f"the model has {n_layers} layers x {n_heads} heads; "
                                        f"{item!r} is out of range")
                rows.add(number * n_heads + index)
    return sorted(rows)


def head_name(row: int, n_heads: int) -> str:
    """``L.H`` for a row of the attention store."""
    return f"{row // n_heads}.{row % n_heads}"
