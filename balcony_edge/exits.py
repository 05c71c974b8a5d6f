"""Exit lists: parsed from the command line or JSON, validated against the base model's depth."""

from __future__ import annotations

from collections.abc import Iterable

from balcony_edge.common.errors import ExitsError


def parse_exits(value: str | Iterable[int], num_layers: int | None) -> tuple[int, ...]:
    """Exits as sorted unique integers with 1 <= k < num_layers (layers); num_layers None checks all but the upper
    bound."""
    items = [part.strip() for part in value.split(",")] if isinstance(value, str) else list(value)
    if not items or items == [""]:
        allowed = f" (1 to {num_layers - 1})" if num_layers else ""
        raise ExitsError(f"no exits given; name exit depths such as --exits 8,16,24{allowed}")
    exits = []
    for item in items:
        try:
            if isinstance(item, float) or isinstance(item, bool):
                raise ValueError
            exits.append(int(item))
        except (TypeError, ValueError):
            raise ExitsError(f"exit {item!r} is not an integer; give depths such as --exits 8,16,24") from None
    duplicated = sorted({k for k in exits if exits.count(k) > 1})
    if duplicated:
        raise ExitsError(f"exit {duplicated[0]} is given twice; list each exit depth once")
    for k in exits:
        if k < 1:
            raise ExitsError(f"exit {k} is out of range: an exit runs at least one backbone layer; give depths from 1")
        if num_layers is not None and k >= num_layers:
            raise ExitsError(
                f"exit {k} is out of range: this base model has {num_layers} "
                f"layers, so exits go from 1 to {num_layers - 1}"
            )
    return tuple(sorted(exits))


def parse_balcony_layers(value: str, exits: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """`--balcony-layers 8:2` as BalconyConfig.deeper: (exit, layers) pairs, for exits among `exits` ("": none)."""
    exits = tuple(exits)
    pairs: dict[int, int] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        k, _, n = (part.strip() for part in item.partition(":"))
        if not (k.isascii() and k.isdigit() and n.isascii() and n.isdigit()):
            raise ExitsError(f"balcony layers {item!r} is not EXIT:LAYERS; give them such as --balcony-layers 8:2")
        if int(k) not in exits:
            listed = ",".join(map(str, exits))
            raise ExitsError(
                f"--balcony-layers names exit {int(k)}, which is not among --exits {listed}; name one of those"
            )
        if int(k) in pairs:
            raise ExitsError(f"--balcony-layers names exit {int(k)} twice; give it once")
        pairs[int(k)] = int(n)
    # One layer is every balcony's default, written as no entry; BalconyConfig checks the other counts.
    return tuple(sorted((k, n) for k, n in pairs.items() if n != 1))
