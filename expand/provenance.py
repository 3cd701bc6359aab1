"""Where a model came from: which base layer each of its layers descends from, how wide the base was, and
the operations applied. Saved as `expand.json` beside the weights, so that `check` can compare a candidate
with its base layer by layer long after the surgery was done."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from expand.config import Config, ConfigError

FILE_NAME = "expand.json"


@dataclass(frozen=True)
class Provenance:
    """layer_map[s] = the base layer whose output the output of layer s corresponds to (-1: the embeddings).
    base_hidden_size: residual coordinates [0, base_hidden_size) are the base model's."""

    base: str | None
    layer_map: tuple[int, ...]
    base_hidden_size: int
    base_num_layers: int
    history: tuple[dict, ...] = field(default_factory=tuple)

    @classmethod
    def identity(cls, config: Config, base: str | None = None) -> Provenance:
        layers = config.num_hidden_layers
        return cls(base, tuple(range(layers)), config.hidden_size, layers)

    def after_depth(self, source_layers, operation: dict, identity_slots=()) -> Provenance:
        """Slots s of the new model run layer source_layers[s] of this one. An identity slot adds nothing,
        so its output corresponds to the previous slot's (-1: the embeddings)."""
        identity = set(int(i) for i in identity_slots)
        new: list[int] = []
        for slot, layer in enumerate(source_layers):
            new.append((new[-1] if new else -1) if slot in identity else self.layer_map[int(layer)])
        return Provenance(self.base, tuple(new), self.base_hidden_size, self.base_num_layers,
                          self.history + (operation,))

    def with_operation(self, operation: dict) -> Provenance:
        """The same layer correspondence, one more operation in the history (widening, healing)."""
        return Provenance(self.base, self.layer_map, self.base_hidden_size, self.base_num_layers,
                          self.history + (operation,))

    def to_json(self) -> dict:
        d = asdict(self)
        d["layer_map"] = list(self.layer_map)
        d["history"] = list(self.history)
        return d

    @classmethod
    def from_json(cls, d: dict) -> Provenance:
        return cls(d.get("base"), tuple(d["layer_map"]), int(d["base_hidden_size"]), int(d["base_num_layers"]),
                   tuple(d.get("history", ())))

    def write(self, directory: Path) -> None:
        (Path(directory) / FILE_NAME).write_text(json.dumps(self.to_json(), indent=2))

    @classmethod
    def read(cls, directory: Path) -> Provenance | None:
        """The provenance saved in a model directory, None if it has none; ConfigError if it is damaged."""
        path = Path(directory) / FILE_NAME
        if not path.exists():
            return None
        try:
            return cls.from_json(json.loads(path.read_text(encoding="utf-8")))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path} is not a valid provenance file ({type(e).__name__}: {e}); restore it, or "
                              "delete it (the model then counts as its own base)") from None
