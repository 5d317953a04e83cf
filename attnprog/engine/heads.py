"""The one head vocabulary: ``parse_heads`` reads a head spec, ``head_label`` writes a head.

A head is ``head_index = layer * n_heads + head`` wherever it is an index, and ``L18.H3`` wherever
people read it (files, pages, messages, prompts). A spec is comma-separated items: ``18.3`` (one
head), ``18.*`` (every head of layer 18), ``*.3`` (head 3 of every layer), or ``all``; labels
(``L18.H3``) are accepted as items too, so a head copied from a report can be passed back.
"""

from __future__ import annotations

from attnprog.errors import AttnProgError

SPEC_HELP = "heads as 18.3, 18.* (a layer), *.3 (a head in every layer), comma-separated, or all"


def parse_heads(spec: str | None, n_layers: int, n_heads: int) -> list[int]:
    """The head indices (layer * n_heads + head) named by ``spec``, sorted, without repeats.

    Every head when ``spec`` is empty, None, ``all`` or ``*``.
    """
    if spec is None or spec.strip().lower() in ("", "all", "*"):
        return list(range(n_layers * n_heads))
    items = [part.strip() for part in spec.split(",") if part.strip()]
    if not items:
        raise AttnProgError(f"no heads in {spec!r}: write {SPEC_HELP}")
    head_indices: set[int] = set()
    for item in items:
        layers, heads = _item_ranges(item, n_layers, n_heads)
        head_indices.update(layer * n_heads + head for layer in layers for head in heads)
    return sorted(head_indices)


def check_spec(spec: str | None) -> None:
    """Refuse a malformed spec before the model's shape is known (a run checks its --heads
    before extraction, not minutes later); the range is checked by :func:`parse_heads`."""
    for item in (spec or "").split(","):
        if item.strip() and item.strip().lower() not in ("all", "*"):
            _item_parts(item.strip())


def _item_parts(item: str) -> tuple[str, str]:
    """The layer and head of one spec item ("*" or digits), AttnProgError when malformed."""
    layer, dot, head = item.partition(".")
    layer, head = layer.removeprefix("L").removeprefix("l"), head.removeprefix("H").removeprefix("h")
    if not dot or not all(part == "*" or (part.isascii() and part.isdigit()) for part in (layer, head)):
        raise AttnProgError(f"head {item!r} is not LAYER.HEAD, LAYER.* or *.HEAD: write {SPEC_HELP} "
                            "(e.g. 18.*,20.3)")
    return layer, head


def _item_ranges(item: str, n_layers: int, n_heads: int) -> tuple[range | list[int], range | list[int]]:
    """The layers and the heads one spec item names, checked against the model's shape."""
    if item.lower() in ("all", "*"):  # as check_spec lets them stand among other items
        return range(n_layers), range(n_heads)
    layer, head = _item_parts(item)
    if (layer != "*" and int(layer) >= n_layers) or (head != "*" and int(head) >= n_heads):
        raise AttnProgError(f"head {item!r} is out of range: the model has {n_layers} layers x "
                            f"{n_heads} heads (layers 0-{n_layers - 1}, heads 0-{n_heads - 1})")
    layers = range(n_layers) if layer == "*" else [int(layer)]
    heads = range(n_heads) if head == "*" else [int(head)]
    return layers, heads


def head_label(head_index: int, n_heads: int) -> str:
    """``L18.H3``: how a head (``head_index = layer * n_heads + head``) is written for people."""
    return head_label_of(*divmod(int(head_index), n_heads))


def head_label_of(layer: int, head: int) -> str:
    """``L18.H3`` for head ``head`` of layer ``layer``."""
    return f"L{layer}.H{head}"
