"""The learning-rate, warmup and objective sweep behind expand.heal's defaults: SmolLM2-135M with layer 12
deleted, distilled from the base for STEPS steps of 2 x 128 tokens of expand's own documentation (the CLI's
default training text), judged every 10 steps on 4 x 256 tokens of the Python Language Reference, a text
it never trains on (mean KL to the base, top-1 agreement, LM loss).

Stages, each choosing by the held-out KL after the last step (seed 0):
    lr       1e-5, 3e-5, 1e-4, 3e-4 at warmup 5, pure distillation
    warmup   0 and 10 at the chosen lr
    lm       LM weight 0.1 and 1 (the old default, LM + KL) at the chosen lr and warmup
    seeds    seeds 1 and 2 of the chosen setting, of the runner-up learning rate and of LM weight 1, so that
             the choices can be read against the spread over seeds

    python -m experiments.healing.sweep

Runs already recorded in sweep.json (same setting and seed) are taken from it, so an interrupted sweep
continues where it stopped; delete sweep.json to run everything again.
"""

from __future__ import annotations

import time

import expand
from expand.heal import HealOptions
from expand.io.embedded import cache_dir
from expand.text import default_text, shipped_text, text_sha256, token_batch
from experiments.benchlib import write_json
from experiments.healing.common import HERE, TEXT, compare, load_results, run, settings

STEPS = 30
BASE_OPTIONS = dict(steps=STEPS, batch_size=2, eval_every=10, checkpoint_every=STEPS)
LRS = (1e-5, 3e-5, 1e-4, 3e-4)
WARMUPS = (0, 10)
LM_WEIGHTS = (0.1, 1.0)


def name_of(options: dict) -> str:
    return f"lr {options['lr']:g}, warmup {options['warmup']}, LM weight {options.get('lm_weight') or 0:g}"


def final_kl(record: dict) -> float:
    return record["after"]["kl"]


def main() -> None:
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir() / "jax-compilation"))
    base = expand.load("smollm2")
    plan = expand.plan_from_layer_spec("0:12,13:", base.config.num_hidden_layers)
    train = token_batch(base, default_text(), 129, None)
    held_out = token_batch(base, shipped_text(TEXT), 256, 4)
    path = HERE / "sweep.json"
    results = load_results(path)
    results["setup"] = {"model": "SmolLM2-135M-Instruct, layer 12 deleted (0:12,13:)", "steps": STEPS,
                        "batch": [2, 128], "train_rows": list(train.shape), "held_out": list(held_out.shape),
                        "device": "CPU, 2 cores (no GPU lent)"}
    results["texts"] = {"expand-docs": text_sha256(default_text()), TEXT: text_sha256(shipped_text(TEXT))}
    recorded = {(r["name"], r["seed"]): r for r in results.get("runs", [])}
    runs: list[dict] = []
    start = time.perf_counter()

    def trial(options: dict, seed: int = 0) -> dict:
        record = recorded.get((name_of(options), seed))
        if record is None or record["options"] != HealOptions(**{**BASE_OPTIONS, **options, "seed": seed,
                                                                 "keep": "last"}).to_json():
            record, _ = run(name_of(options), base, plan, train, held_out, base, {**BASE_OPTIONS, **options}, seed)
        runs.append(record)
        results["runs"] = runs
        write_json(path, results)
        return record

    stage_lr = [trial({"lr": lr, "warmup": 5}) for lr in LRS]
    ranked = sorted(stage_lr, key=final_kl)
    lr, runner_up = ranked[0]["options"]["lr"], ranked[1]["options"]["lr"]
    stage_warmup = [trial({"lr": lr, "warmup": w}) for w in WARMUPS] + [ranked[0]]
    warmup = min(stage_warmup, key=final_kl)["options"]["warmup"]
    chosen = {"lr": lr, "warmup": warmup}
    stage_lm = [trial({**chosen, "lm_weight": w}) for w in LM_WEIGHTS]
    for options in (chosen, {"lr": runner_up, "warmup": warmup}, {**chosen, "lm_weight": 1.0}):
        for seed in (0, 1, 2):
            if not any(r["name"] == name_of(options) and r["seed"] == seed for r in runs):
                trial(options, seed)
    summary = settings(runs)
    best, second, lm_one = (name_of(o) for o in (chosen, {"lr": runner_up, "warmup": warmup},
                                                  {**chosen, "lm_weight": 1.0}))
    results.update(
        chosen=chosen, runner_up_lr=runner_up, stage_lm=[r["name"] for r in stage_lm], settings=summary,
        comparisons=[compare(summary, best, second, k) for k in ("kl", "top1")] +
                    [compare(summary, best, lm_one, k) for k in ("kl", "top1", "lm")],
        wall_s=round(time.perf_counter() - start))
    write_json(path, results)
    plot(results, HERE / "sweep.png")


def plot(results: dict, path) -> None:
    """Held-out KL against step for every setting (mean over the seeds it ran with)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, summary in results["settings"].items():
        chosen = [r for r in results["runs"] if r["name"] == name]
        steps = [e["step"] for e in chosen[0]["held_out"]]
        values = np.array([[e["kl"] for e in r["held_out"]] for r in chosen])
        line, = ax.plot(steps, values.mean(0), "o-", markersize=3, label=f"{name} (n={len(chosen)})")
        if len(chosen) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), color=line.get_color(), alpha=0.2)
    ax.set(xlabel="step", ylabel="KL to the base on held-out Python reference", yscale="log",
           title="SmolLM2 without layer 12, healed on expand's docs (2 x 128 tokens per step)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
