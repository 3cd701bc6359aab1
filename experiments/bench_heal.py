"""Peak memory and step time of `expand.heal` on SmolLM2-135M (layer 12 deleted, distilled from the base)
against batch and sequence length, for this checkout and, when given, another one (the code before the
chunked loss), each configuration in a fresh child process (peak RSS from wait4).

Each child heals for STEPS steps on exactly one batch of B windows of T + 1 tokens of the Python Language
Reference (so every version sees the same tokens at every step, whatever its batch order), with LM + KL
(weights 1 and 1) and a cosine schedule over STEPS steps: the objective and schedule of the code before,
so that the per-step losses of both are comparable. Step time: the median over steps 2..STEPS (step 1
includes compilation).

    git worktree add --detach /tmp/expand-before 843b80c    # the code before the chunked loss
    python -m experiments.bench_heal --before /tmp/expand-before

Writes experiments/results/bench_heal.json and .txt (and bench_heal.png)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).parents[1]
STEPS = 3
CONFIGS = [(2, 256), (4, 128), (4, 256), (4, 512)]  # (batch, sequence length)
BEFORE_CONFIGS = CONFIGS[:3]  # 4 x 512 would need about 12 GB before, more than this shared machine can spare
REMAT_CONFIGS = CONFIGS[2:]
LOSS_KEYS = ("loss", "lm", "kl")


def child(batch: int, seq_len: int, remat: bool, out: str) -> None:
    """One measurement, in this process: heal and write the step times and per-step losses to `out`."""
    import inspect
    import time

    import numpy as np

    import expand
    from expand.heal import HealOptions, heal
    from expand.text import shipped_text, token_batch

    model = expand.load("smollm2")
    plan = expand.plan_from_layer_spec("0:12,13:", model.config.num_hidden_layers)
    tokens = token_batch(model, shipped_text("python-reference"), seq_len + 1, 2 * batch)
    options = dict(steps=STEPS, lr=1e-4, warmup=0, batch_size=batch, lm_weight=1.0, distill_weight=1.0)
    kwargs = {}
    if "eval_tokens" in inspect.signature(heal).parameters:  # the held-out evaluation: one other window
        options.update(decay_steps=STEPS, remat=remat, keep="last")
        kwargs["eval_tokens"] = tokens[batch:batch + 1]
    elif remat:
        sys.exit("this version of expand has no remat")
    times = [time.perf_counter()]
    result = heal(model, tokens[:batch], plan, teacher=model, options=HealOptions(**options),
                  on_step=lambda step, logs: times.append(time.perf_counter()), **kwargs)
    record = {"first_step_s": times[1] - times[0], "step_s": float(np.median(np.diff(times[1:]))),
              "losses": [{k: h[k] for k in LOSS_KEYS} for h in result.history]}
    Path(out).write_text(json.dumps(record))


def measure(source: Path, label: str, batch: int, seq_len: int, remat: bool) -> dict:
    from experiments.benchlib import run_measured

    load = os.getloadavg()[0]  # how busy the machine was as this configuration started
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "child.json"
        env = {"PYTHONPATH": str(source), "JAX_PLATFORMS": "cpu"}
        measured = run_measured([sys.executable, __file__, "--child", str(batch), str(seq_len), str(int(remat)),
                                 str(out)], env=env)
        record = json.loads(out.read_text())
    row = {"code": label, "batch": batch, "seq_len": seq_len, "remat": remat, "load_average_1min": load, **measured,
           **record}
    print(f"{label:7s} {batch} x {seq_len:4d} remat={remat!s:5s} peak RSS {row['peak_rss_mib'] / 1024:6.2f} GiB, "
          f"step {row['step_s']:6.2f} s, losses {[round(x['loss'], 5) for x in row['losses']]}", flush=True)
    return row


def summary(rows: list[dict]) -> list[str]:
    """Per configuration measured both ways: the peak RSS ratio and the largest loss difference."""
    lines = []
    for r in rows:
        if r["code"] != "before":
            continue
        for after in (a for a in rows if a["code"] == "after" and (a["batch"], a["seq_len"]) == (r["batch"], r["seq_len"])):
            diff = max(abs(x[k] - y[k]) for x, y in zip(r["losses"], after["losses"]) for k in LOSS_KEYS)
            lines.append(f"{r['batch']} x {r['seq_len']}{' remat' if after['remat'] else ''}: peak RSS "
                         f"{r['peak_rss_mib'] / after['peak_rss_mib']:.2f}x lower, step time x "
                         f"{after['step_s'] / r['step_s']:.2f}, max |loss difference| over {STEPS} steps {diff:.1e}")
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (memory, speed) = plt.subplots(1, 2, figsize=(11, 4))
    for code, remat, style in (("before", False, "s--"), ("after", False, "o-"), ("after", True, "^-")):
        chosen = sorted((r for r in rows if r["code"] == code and r["remat"] == remat),
                        key=lambda r: r["batch"] * r["seq_len"])
        if not chosen:
            continue
        tokens = [r["batch"] * r["seq_len"] for r in chosen]
        label = code + (", --remat" if remat else "")
        memory.plot(tokens, [r["peak_rss_mib"] / 1024 for r in chosen], style, label=label)
        speed.plot(tokens, [r["step_s"] for r in chosen], style, label=label)
    memory.set(xlabel="tokens per step (batch x sequence length)", ylabel="peak RSS (GiB)", xscale="log")
    speed.set(xlabel="tokens per step (batch x sequence length)", ylabel="seconds per step", xscale="log")
    memory.legend()
    fig.suptitle("expand heal on SmolLM2-135M (layer 12 deleted, LM + KL to the base), 2-core CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    from experiments.benchlib import RESULTS, python_json, write_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, help="a checkout of the code to compare with (e.g. 843b80c)")
    args = parser.parse_args()
    rows = []
    if args.before is not None:
        rows += [measure(args.before, "before", b, t, False) for b, t in BEFORE_CONFIGS]
    rows += [measure(ROOT, "after", b, t, False) for b, t in CONFIGS]
    rows += [measure(ROOT, "after", b, t, True) for b, t in REMAT_CONFIGS]
    device = python_json("from benchlib import device_line; print(json.dumps(device_line()))")
    lines = [f"device: {device}", f"SmolLM2-135M, layer 12 deleted, LM + KL to the base, {STEPS} steps per run", ""]
    lines += [f"{r['code']:7s} {r['batch']} x {r['seq_len']:4d}{' --remat' if r['remat'] else '        '}  peak RSS "
              f"{r['peak_rss_mib'] / 1024:6.2f} GiB  step {r['step_s']:6.2f} s  (load average {r['load_average_1min']:.1f} "
              "at its start)" for r in rows]
    lines += [""] + summary(rows)
    from expand.text import shipped_text, text_sha256

    texts = {"python-reference": text_sha256(shipped_text("python-reference"))}  # what every child trains on
    write_results("bench_heal", {"device": device, "texts": texts, "steps": STEPS, "rows": rows}, "\n".join(lines))
    plot(rows, RESULTS / "bench_heal.png")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(int(sys.argv[2]), int(sys.argv[3]), bool(int(sys.argv[4])), sys.argv[5])
    else:
        main()
