"""Presenting results: one number format for every verb, tables on the console, and the check plots.

Numbers are formatted by what they are, the same in `check`, `ablate`, `show` and the demo: agreement as a
percentage, losses with four decimals, KL and logit differences in scientific notation, parameter counts
with thousands separators, config floats (rms_norm_eps) as config.json writes them (Python's repr).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.table import Table
from rich.text import Text

from expand.check import FLOOR_FACTOR

console = Console(width=None if sys.stdout.isatty() else 150)

PERCENT = {"top1", "top1_agreement", "top-1"}
FIXED = {"loss", "ppl", "lm", "loss_increase"}


def format_value(name: str, value) -> str:
    """One value of a metric named `name`, formatted the way every table of expand shows it."""
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if name in PERCENT:
        return f"{value:.1%}"
    if name in FIXED:
        return f"{value:.4f}"
    return f"{value:.2e}"


def format_config_float(value: float) -> str:
    """A config float as config.json writes it (1e-05, 5.999999999999999e-06)."""
    return repr(float(value))


def print_table(rows: Sequence[dict[str, str]], title: str, left: Sequence[str] = ("candidate", "name"),
                styles: dict[str, dict[str, str]] | None = None) -> None:
    """Rows of already formatted cells (every row has the same keys) as one table; `styles` colours cells
    by column and value (e.g. the verdict). Cells are printed literally, never parsed as markup."""
    table = Table(title=Text(title))
    for column in rows[0]:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*[Text(v, style=(styles or {}).get(k, {}).get(v, "")) for k, v in row.items()])
    console.print(table)


VERDICT_STYLES = {"verdict": {"preserved": "green", "drifted": "red", "non-finite": "bold red"}}


def summary_row(report) -> dict[str, str]:
    """The table row of one `expand.check.Report`."""
    return {
        "candidate": report.candidate,
        "max |dlogit|": format_value("max_abs_logit_delta", report.max_abs_logit_delta),
        "floor": f"{report.floor:.1e}",
        "mean KL": format_value("mean_kl", report.mean_kl),
        "max KL": format_value("max_kl", report.max_kl),
        "top-1": format_value("top1", report.top1_agreement),
        "first drift": "-" if report.first_drift_layer is None else str(report.first_drift_layer),
        "verdict": report.verdict,
    }


def print_reports(reports, title: str) -> None:
    print_table([summary_row(r) for r in reports], title, styles=VERDICT_STYLES)


def pyplot():
    """matplotlib's pyplot on the non-interactive Agg backend (plots are files)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def slot_label(layers: Sequence[dict]) -> str:
    """How the x axis of a drift plot maps candidate slots to base layers, in words."""
    if all(layer["slot"] == layer["base_layer"] for layer in layers):
        return "layer (candidate slot s is base layer s)"
    return "candidate slot (each compared with the base layer it descends from; see the report's layers)"


def plot_layers(reports, path: str | Path) -> None:
    """Drift per layer (log scale) of one or more reports, with each layer's floor. A drift of exactly 0
    (the same bits as the base) has no logarithm: it is drawn at the bottom of the axis, 1e-12."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    zero_floor = 1e-12
    for report in reports:
        slots = [layer["slot"] for layer in report.layers]
        ax.plot(slots, [max(layer["drift"], zero_floor) for layer in report.layers], marker=".",
                label=report.candidate)
    first = reports[0]
    ax.plot([layer["slot"] for layer in first.layers],
            [FLOOR_FACTOR * max(layer["floor"], zero_floor) for layer in first.layers], "k--", lw=1,
            label=f"{FLOOR_FACTOR:g} x floor ({first.dtype})")
    ax.set_yscale("log")
    ax.set_xlabel(slot_label(first.layers))
    ax.set_ylabel("max |delta h| / max |h_base|")
    ax.set_title("residual-stream drift per layer (an exactly-zero drift is drawn at 1e-12, the axis floor)",
                 fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def plot_summary(reports, path: str | Path) -> None:
    """Bar chart of max |delta logit| per candidate against the tolerance (0 drawn at 1e-8)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    values = [min(max(r.max_abs_logit_delta, 1e-8), 1e8) if math.isfinite(r.max_abs_logit_delta) else 1e8
              for r in reports]
    colors = ["tab:green" if r.preserved else "tab:red" for r in reports]
    ax.barh(range(len(reports)), values, color=colors)
    ax.axvline(reports[0].tolerance, color="k", ls="--", lw=1, label=f"tolerance ({FLOOR_FACTOR:g} x floor)")
    ax.set_yticks(range(len(reports)), [r.candidate for r in reports], fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("max |delta logit| vs the base (0 drawn at 1e-8; non-finite at 1e8)")
    ax.invert_yaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)

