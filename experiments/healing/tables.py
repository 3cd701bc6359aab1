"""The README's tables, printed from the committed results (sweep.json, results.json, cli_heal.json), so
that every number in experiments/healing/README.md is one these files hold.

    python -m experiments.healing.tables
"""

from __future__ import annotations

import json

from experiments.healing.common import HERE


def cell(s: dict, scale: float = 1.0, digits: int = 3, unit: str = "") -> str:
    """mean ± sd (min..max) over seeds, or the single value."""
    f = f".{digits}f"
    if s["n"] == 1:
        return f"{s['mean'] * scale:{f}}{unit}"
    return (f"{s['mean'] * scale:{f}}{unit} ± {s['sd'] * scale:{f}} ({s['min'] * scale:{f}}..{s['max'] * scale:{f}})")


def before_cell(runs: list[dict], key: str, scale: float = 1.0, digits: int = 3) -> str:
    values = sorted({round(r["before"][key] * scale, digits) for r in runs})
    return " / ".join(f"{v:.{digits}f}" for v in values)


def settings_table(block: dict) -> list[str]:
    lines = ["| setting (n seeds) | KL to base before | after | top-1 before | after (%) | LM loss before | after |",
             "|---|---|---|---|---|---|---|"]
    for name, s in block["settings"].items():
        runs = [r for r in block["runs"] if r["name"] == name]
        lines.append(f"| {name} ({s['kl']['n']}) | {before_cell(runs, 'kl', digits=4)} | {cell(s['kl'], digits=4)} | "
                     f"{before_cell(runs, 'top1', 100, 1)} | {cell(s['top1'], 100, 1)} | {before_cell(runs, 'lm')} | "
                     f"{cell(s['lm'])} |")
    return lines


def comparisons(block: dict) -> list[str]:
    lines = []
    for c in block.get("comparisons", []):
        verdict = "resolved (the seed ranges do not overlap)" if c["resolved"] else "NOT resolved (the ranges overlap)"
        lines.append(f"- {c['key']}: {c['a']} {c['mean_a']:.4f} vs {c['b']} {c['mean_b']:.4f} "
                     f"(difference {c['difference']:+.4f}): {verdict}")
    return lines


def main() -> None:
    for name in ("sweep.json", "results.json", "cli_heal.json"):
        path = HERE / name
        if not path.exists():
            print(f"({name} not there yet)\n")
            continue
        results = json.loads(path.read_text())
        print(f"## {name}\n")
        if name == "cli_heal.json":
            check = results["check_python_reference"]
            for when in ("before", "after"):
                c = check[when]
                print(f"- {when}: mean KL {c['mean_kl']:.4f}, max KL {c['max_kl']:.3f}, top-1 "
                      f"{c['top1_agreement']:.1%} ({c['tokens']} tokens)")
            for command in results["commands"]:
                print(f"- `{command['command']}`: exit {command['exit']}, {command['wall_s']} s; "
                      f"{command['output'][-1] if command['output'] else ''}")
            print()
            continue
        blocks = ({"sweep": results} if name == "sweep.json"
                  else {k: v for k, v in results.items() if k not in ("setup", "texts")})
        for study, block in blocks.items():
            print(f"### {study}\n")
            print("\n".join(settings_table(block)))
            print()
            print("\n".join(comparisons(block)))
            print()


if __name__ == "__main__":
    main()
