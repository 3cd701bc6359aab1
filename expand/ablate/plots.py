"""The ablation plots: importance against measured effect, pruning curves, window grids, per-variant effects."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from expand.report import pyplot

if TYPE_CHECKING:
    from expand.ablate.table import Table


def plot_all(table: Table, directory: Path) -> list[str]:
    """importance.png always; pruning.png for prune sweeps, window.png for window grids, effect.png for
    the one-change-per-layer sweeps. Returns the names written."""
    written = ["importance.png"]
    plot_importance(table, directory / "importance.png")
    kind = table.sweep.split(":")[0]
    if kind.startswith("prune"):
        plot_pruning({table.sweep: table}, directory / "pruning.png")
        written.append("pruning.png")
    elif kind == "window":
        plot_window_grid(table, directory / "window.png")
        written.append("window.png")
    else:
        plot_effects(table, directory / "effect.png")
        written.append("effect.png")
    return written


def plot_importance(table: Table, path: Path) -> None:
    """Block Influence and angular distance per layer; for delete sweeps also the measured KL of each
    removal (each curve scaled to its own maximum, so their shapes compare)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 4))
    curves = {"Block Influence": table.importance["block_influence"],
              **{f"angular distance, n={n}": v for n, v in table.importance["angular_distance"].items()}}
    if table.sweep.split(":")[0] in ("delete-one", "delete-block") and "mean_kl" in table.rows[0]:
        curves["measured: KL to base after removal"] = [r["mean_kl"] for r in table.rows]
    for label, values in curves.items():
        values = np.asarray(values, float)
        ax.plot(range(len(values)), values / (values.max() or 1.0), marker=".", label=label)
    ax.set_xlabel("layer (first layer of the block)")
    ax.set_ylabel("score / max score")
    rho = "".join(f"\nSpearman {k}: {v:+.2f}" for k, v in table.correlations.items())
    ax.set_title(f"layer importance, {Path(table.model).name}{rho}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_pruning(tables: dict[str, Table], path: Path, metric: str = "loss") -> None:
    """Loss (or another metric) against depth for one or more pruning paths, with the base's value."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, table in tables.items():
        depths = [table.base["depth"]] + [r["depth"] for r in table.rows]
        values = [table.base[metric]] + [r[metric] for r in table.rows]
        ax.plot(depths, values, marker="o", ms=3, label=label)
    ax.axhline(next(iter(tables.values())).base[metric], color="k", lw=0.8, ls="--", label="base")
    ax.invert_xaxis()
    ax.set_xlabel("layers kept")
    ax.set_ylabel(metric)
    ax.set_yscale("log" if metric in ("mean_kl", "ppl") else "linear")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_window_grid(table: Table, path: Path, metric: str = "loss") -> None:
    """Heatmap of a window sweep's metric over window width x stride (blank where stride > width)."""
    plt = pyplot()
    cells = {(r["width"], r["stride"]): r for r in table.rows}
    widths, strides = sorted({w for w, _ in cells}), sorted({s for _, s in cells})
    grid = np.full((len(widths), len(strides)), np.nan)
    for (w, s), row in cells.items():
        grid[widths.index(w), strides.index(s)] = row[metric]
    fig, ax = plt.subplots(figsize=(1.2 * len(strides) + 3, 0.6 * len(widths) + 2))
    image = ax.imshow(grid, cmap="viridis", aspect="auto")
    for (i, j), value in np.ndenumerate(grid):
        if not np.isnan(value):
            depth = cells[(widths[i], strides[j])]["depth"]
            ax.text(j, i, f"{value:.3f}\n{depth} L", ha="center", va="center", fontsize=7, color="w")
    ax.set_xticks(range(len(strides)), strides)
    ax.set_yticks(range(len(widths)), widths)
    ax.set_xlabel("stride")
    ax.set_ylabel("window width")
    ax.set_title(f"self-merge {metric} (base {table.base[metric]:.3f}, {table.base['depth']} layers)", fontsize=9)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_effects(table: Table, path: Path) -> None:
    """Loss increase and mean KL of every variant, in sweep order, each on its own labelled axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(7, 0.32 * len(table.rows) + 2), 4.5))
    x = np.arange(len(table.rows))
    if "loss" in table.rows[0]:
        ax.bar(x, [r["loss"] - table.base["loss"] for r in table.rows], color="tab:blue", label="loss - base loss")
        ax.set_ylabel("loss - base loss (nats per token)", fontsize=10)
    if "mean_kl" in table.rows[0]:
        kl_axis = ax.twinx()
        kl_axis.plot(x, [r["mean_kl"] for r in table.rows], "o", color="tab:red", ms=4, label="mean KL to base")
        kl_axis.set_ylabel("mean KL(base || variant) (nats)", fontsize=10, color="tab:red")
        kl_axis.legend(fontsize=9, loc="upper right")
    ax.set_xticks(x, [r["name"] for r in table.rows], rotation=90, fontsize=8)
    ax.set_xlabel("variant", fontsize=10)
    ax.set_title(f"{table.sweep} on {Path(table.model).name}", fontsize=11)
    ax.legend(fontsize=9, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
