"""The sweep grammar (`delete-one`, `window:W:S`, ...; see `expand.ablate`) and the depth variants each
sweep stands for, as LayerPlans named by their canonical layer spec."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from expand.surgery.layerspec import parse_layer_spec, to_layer_spec
from expand.surgery.plan import LayerPlan, Slot

KINDS = ("delete-one", "duplicate-one", "delete-block", "window", "swap-adjacent", "prune-greedy", "prune-bi",
         "specs")


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep. kind: one of KINDS; block: n of delete-block; widths/strides: window grid;
    target: final depth of the prune sweeps; specs: the layer specs of `specs:FILE`."""

    kind: str
    block: int = 1
    widths: tuple[int, ...] = ()
    strides: tuple[int, ...] = ()
    target: int = 0
    specs: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        if self.kind == "delete-block":
            return f"delete-block:{self.block}"
        if self.kind == "window":
            return f"window:{','.join(map(str, self.widths))}:{','.join(map(str, self.strides))}"
        if self.kind.startswith("prune"):
            return f"{self.kind}:{self.target}"
        return self.kind


def _ints(text: str, what: str, sweep: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"sweep {sweep!r}: {what} {text!r} is not an integer or a comma list of integers") from None
    if any(v < 1 for v in values):
        raise ValueError(f"sweep {sweep!r}: {what} must be at least 1")
    return values


def parse_sweep(text: str, num_layers: int) -> Sweep:
    """Parse and validate a sweep against a model of `num_layers` layers (errors before any compute)."""
    kind, _, rest = text.partition(":")
    hint = "choose delete-one, duplicate-one, delete-block:N, window:W:S, swap-adjacent, prune-greedy[:T], " \
           "prune-bi[:T] or specs:FILE"
    if kind not in KINDS:
        raise ValueError(f"unknown sweep {text!r}; {hint}")
    if kind in ("delete-one", "duplicate-one", "swap-adjacent"):
        if rest:
            raise ValueError(f"sweep {kind} takes no argument (got {text!r})")
        if kind == "swap-adjacent" and num_layers < 2:
            raise ValueError("swap-adjacent needs at least 2 layers")
        if kind == "delete-one" and num_layers < 2:
            raise ValueError("delete-one needs at least 2 layers (a model keeps at least one)")
        return Sweep(kind)
    if kind == "delete-block":
        (n,) = _ints(rest, "block size", text) if rest else (None,)
        if n is None or n >= num_layers:
            raise ValueError(f"sweep {text!r}: write delete-block:N with 1 <= N < {num_layers} (layers kept >= 1)")
        return Sweep(kind, block=n)
    if kind == "window":
        parts = rest.split(":")
        if len(parts) != 2:
            raise ValueError(f"sweep {text!r}: write window:W:S, e.g. window:8:4 or window:6,8,10:2,4")
        widths, strides = _ints(parts[0], "width", text), _ints(parts[1], "stride", text)
        bad = [w for w in widths if w > num_layers]
        if bad:
            raise ValueError(f"sweep {text!r}: window widths {bad} exceed the model's {num_layers} layers")
        if not any(s <= w for w in widths for s in strides):
            raise ValueError(f"sweep {text!r}: every stride is wider than every window, so layers would be "
                             "skipped; use strides <= widths")
        return Sweep(kind, widths=widths, strides=strides)
    if kind in ("prune-greedy", "prune-bi"):
        (target,) = _ints(rest, "target depth", text) if rest else (num_layers // 2,)
        if not 1 <= target < num_layers:
            raise ValueError(f"sweep {text!r}: the target depth must be between 1 and {num_layers - 1}")
        return Sweep(kind, target=target)
    path = Path(rest)
    if not rest or not path.is_file():
        raise ValueError(f"sweep {text!r}: write specs:FILE with a file of layer specs, one per line")
    specs = tuple(line.split("#")[0].strip() for line in path.read_text().splitlines())
    specs = tuple(s for s in specs if s)
    if not specs:
        raise ValueError(f"{path} has no layer specs (one per line, # for comments)")
    for number, spec in enumerate(specs, 1):
        try:
            parse_layer_spec(spec, num_layers)
        except ValueError as e:
            raise ValueError(f"{path}, spec {number}: {e}") from None
    return Sweep(kind, specs=specs)


def plan_of(layers: Sequence[int], num_layers: int) -> LayerPlan:
    """The plan running `layers` in order; its description is the canonical layer spec."""
    layers = [int(i) for i in layers]
    return LayerPlan(tuple(Slot(i) for i in layers), num_layers, description=to_layer_spec(layers))


def window_layers(num_layers: int, width: int, stride: int) -> list[int]:
    """Overlapping slices [0, w), [s, s + w), ... with the last slice ending at num_layers."""
    starts = list(range(0, num_layers - width + 1, stride))
    if starts[-1] != num_layers - width:
        starts.append(num_layers - width)
    return [layer for start in starts for layer in range(start, start + width)]


def fixed_variants(sweep: Sweep, num_layers: int) -> list[tuple[str, LayerPlan, dict]]:
    """(name, plan, fields) of every variant of a sweep whose variants do not depend on measurements;
    fields locate the variant in its sweep (layer, first layer of a block, window width and stride)."""
    layers = list(range(num_layers))
    out: list[tuple[str, list[int], dict]] = []
    if sweep.kind == "delete-one":
        out = [(f"delete {i}", layers[:i] + layers[i + 1:], {"layer": i}) for i in layers]
    elif sweep.kind == "duplicate-one":
        out = [(f"duplicate {i}", layers[:i + 1] + layers[i:], {"layer": i}) for i in layers]
    elif sweep.kind == "delete-block":
        n = sweep.block
        out = [(f"delete {i}-{i + n - 1}", layers[:i] + layers[i + n:], {"layer": i})
               for i in range(num_layers - n + 1)]
    elif sweep.kind == "swap-adjacent":
        out = [(f"swap {i},{i + 1}", layers[:i] + [i + 1, i] + layers[i + 2:], {"layer": i})
               for i in range(num_layers - 1)]
    elif sweep.kind == "window":
        out = [(f"window w={w} s={s}", window_layers(num_layers, w, s), {"width": w, "stride": s})
               for w in sweep.widths for s in sweep.strides if s <= w]
    elif sweep.kind == "specs":
        out = [(spec, list(parse_layer_spec(spec, num_layers)), {}) for spec in sweep.specs]
    else:
        raise ValueError(f"{sweep.kind} variants depend on measurements; see ablate()")
    return [(name, plan_of(ids, num_layers), fields) for name, ids, fields in out]


def removal_path(num_layers: int, order: Sequence[int]) -> list[tuple[str, LayerPlan, dict]]:
    """Variants removing order[:1], order[:2], ...: a pruning curve."""
    variants = []
    for k in range(1, len(order) + 1):
        gone = [int(i) for i in order[:k]]
        plan = plan_of([i for i in range(num_layers) if i not in gone], num_layers)
        variants.append((f"remove {gone[-1]}", plan, {"removed": gone[-1]}))
    return variants
