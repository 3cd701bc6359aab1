"""An ablation's results as a table: JSON, CSV (importance scores beside the measured effects) and plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from expand.ablate.evaluate import METRICS


@dataclasses.dataclass
class Table:
    """An ablation's results: one row per variant (name, layer_spec, depth, the metrics, their values per
    eval window and their 95% bootstrap intervals `ci`), the base's row, importance scores, the rank
    correlations of scores with measured effects (and their bootstrap intervals), and compile count."""

    model: str
    sweep: str
    tokens: tuple[int, int]
    base: dict
    rows: list[dict]
    importance: dict
    correlations: dict
    compilations: int
    lengths: list[int]
    correlation_intervals: dict = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def scores_of(self, row: dict) -> dict[str, float]:
        """The importance scores of the layer (or block) a row changes: Block Influence of its `layer` (or
        `removed` layer) and the angular distance of the block starting there."""
        layer = row.get("layer", row.get("removed"))
        if layer is None:
            return {}
        scores = {"block_influence": self.importance["block_influence"][layer]}
        for n, distances in self.importance["angular_distance"].items():
            if layer < len(distances):
                scores[f"angular_distance_n{n}"] = distances[layer]
        return scores

    def write(self, directory: str | Path) -> list[str]:
        """results.json, results.csv (each row's importance scores beside its measured effects) and the PNG
        plots; returns the file names written."""
        from expand.ablate.plots import plot_all

        directory = Path(directory)
        (directory / "results.json").write_text(json.dumps(self.to_json(), indent=2) + "\n")
        fields = [k for k in ("layer", "width", "stride", "removed", "candidates") if k in self.rows[0]]
        scores = list(self.scores_of(self.rows[0]))
        spread = [f"{m}_{end}" for m in self.rows[0].get("ci", {}) for end in ("low", "high")]
        columns = ["name", "layer_spec", "depth", *fields, *[m for m in METRICS if m in self.rows[0]], *spread,
                   *scores]
        lines = [",".join(columns)]
        for row in [{"name": "base", "layer_spec": "all", "depth": self.base["depth"], **self.base}, *self.rows]:
            intervals = {f"{m}_{end}": value for m, pair in row.get("ci", {}).items()
                         for end, value in zip(("low", "high"), pair)}
            row = {**row, **intervals, **self.scores_of(row)}
            lines.append(",".join(_csv_cell(row.get(c, "")) for c in columns))
        (directory / "results.csv").write_text("\n".join(lines) + "\n")
        return ["results.json", "results.csv", *plot_all(self, directory)]


def _csv_cell(value) -> str:
    text = f"{value:.6g}" if isinstance(value, float) else str(value)
    return f'"{text}"' if "," in text else text
