"""The layer-spec language of chatllm.cpp's `--layer_spec`, with Python slice rules and strict checking.

A spec is comma-separated items, each `i`, `start:stop` or `start:stop:step` (stop exclusive; open ends
default to 0 and N, or N-1 and "before 0" for a negative step; negative numbers count from the end), or
`all`. On 32 layers `0:8,4:12,8:16,12:20,16:24,20:28,24:32` gives 56 slots; `0:10,10:20:2,20:` gives 27.

chatllm.cpp and mergekit accept out-of-range, reversed (`8:4`) and empty items silently and build a model
other than the one meant; here each is a ValueError that names the item and says what to write instead.
A negative step is an explicit request for reverse order (`7:3:-1` is 7, 6, 5, 4) and is allowed.
"""

from __future__ import annotations

import re

_INT = re.compile(r"^\s*-?\d+\s*$")
_DASH_RANGE = re.compile(r"^\s*(\d+)\s*-\s*(\d+)\s*$")  # 0-24, a common way to write layers 0..24


def _bound(text: str, item: str, num_layers: int, what: str) -> int | None:
    text = text.strip()
    if text == "":
        return None
    if not _INT.match(text):
        dash = _DASH_RANGE.match(item)
        hint = (f"; ranges are start:stop with stop exclusive: did you mean {dash[1]}:{int(dash[2]) + 1}?"
                if dash else "")
        raise ValueError(f"layer spec item {item!r}: {what} {text!r} is not an integer{hint}")
    value = int(text)
    if not -num_layers <= value <= num_layers:
        raise ValueError(
            f"layer spec item {item!r}: {what} {value} is out of range for {num_layers} layers "
            f"(use -{num_layers}..{num_layers})"
        )
    return value


def _parse_item(item: str, num_layers: int) -> list[int]:
    if item.strip() == "":
        raise ValueError("layer spec has an empty item (two commas in a row, or a trailing comma)")
    if item.strip() == "all":
        return list(range(num_layers))
    parts = item.split(":")
    if len(parts) > 3:
        raise ValueError(f"layer spec item {item!r}: too many ':' (write i, start:stop or start:stop:step)")
    if len(parts) == 1:
        index = _bound(parts[0], item, num_layers, "index")
        if index == num_layers:
            raise ValueError(f"layer spec item {item!r}: layer {index} does not exist (layers are 0..{num_layers - 1})")
        return [index % num_layers]
    start = _bound(parts[0], item, num_layers, "start")
    stop = _bound(parts[1], item, num_layers, "stop")
    step = _bound(parts[2], item, num_layers, "step") if len(parts) == 3 else None
    if step == 0:
        raise ValueError(f"layer spec item {item!r}: step 0 selects nothing (use a positive or negative step)")
    layers = list(range(num_layers))[slice(start, stop, step)]
    if not layers:
        hint = "" if (step or 1) < 0 else "; for reverse order write a negative step, e.g. 7:3:-1"
        raise ValueError(f"layer spec item {item!r}: the range is empty or reversed{hint}")
    return layers


def parse_layer_spec(spec: str, num_layers: int) -> tuple[int, ...]:
    """'0:8,4:12' on num_layers layers -> (0, ..., 7, 4, ..., 11): the source layer of every slot."""
    if not isinstance(spec, str):
        raise ValueError(f"a layer spec is a string like '0:8,4:12', got {type(spec).__name__}")
    if num_layers <= 0:
        raise ValueError(f"num_layers must be positive, got {num_layers}")
    if not spec.strip():
        raise ValueError("the layer spec is empty: write items like 0:20,10:30 (or 'all' for every layer once)")
    slots = [layer for item in spec.split(",") for layer in _parse_item(item, num_layers)]
    if not slots:
        raise ValueError(f"layer spec {spec!r} selects no layers")
    return tuple(slots)


def _starts_run(layers, j: int) -> bool:
    """layers[j], layers[j+1], layers[j+2] form an arithmetic run of their own."""
    return j + 2 < len(layers) and layers[j + 1] - layers[j] == layers[j + 2] - layers[j + 1] != 0


def _runs(layers) -> list[tuple[int, int, int]]:
    """Greedy maximal arithmetic runs (first, last, step): step +-1 runs of any length, other steps only
    from three elements on (so 3, 7 stays two singles)."""
    layers = list(layers)
    runs, i = [], 0
    while i < len(layers):
        j = i
        if i + 1 < len(layers) and layers[i + 1] != layers[i]:
            step = layers[i + 1] - layers[i]
            j = i + 1
            while j + 1 < len(layers) and layers[j + 1] - layers[j] == step:
                j += 1
            if abs(step) != 1 and j - i < 2:
                j = i
            elif j > i and _starts_run(layers, j) and (j - 1 - i >= 2 or (abs(step) == 1 and j - 1 > i)):
                j -= 1  # hand the last element to the run that follows: 0-9, 10-18 step 2, not 0-10, 12-20
        runs.append((layers[i], layers[j], layers[i + 1] - layers[i] if j > i else 1))
        i = j + 1
    return runs


def format_layer_map(layers) -> str:
    """(0..7, 4..11) -> '0-7, 4-11': the slot -> source-layer map compressed into runs."""
    def run(first, last, step):
        if first == last:
            return str(first)
        return f"{first}-{last}" if abs(step) == 1 else f"{first}-{last} step {step}"
    return ", ".join(run(*r) for r in _runs(layers))


def to_layer_spec(layers) -> str:
    """A short layer spec that parses back to exactly `layers`."""
    items = []
    for first, last, step in _runs(layers):
        if first == last:
            items.append(str(first))
        else:
            stop = last + (1 if step > 0 else -1)
            items.append(f"{first}:{stop if stop >= 0 else ''}" + ("" if step == 1 else f":{step}"))
    return ",".join(items)
