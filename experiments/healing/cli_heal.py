"""The command line's default healing, end to end, judged on text it never trained on: SmolLM2-135M with
layer 12 deleted, healed with `expand heal DEL OUT --teacher smollm2 --steps 30` (every other option at its
default: distillation, 4 x 256-token windows of expand's own documentation, the last tenth held out), then
checked against the base before and after with `expand check ... --text python-reference` (4 x 512 tokens
of the Python Language Reference, which healing never sees).

    python -m experiments.healing.cli_heal

Writes experiments/healing/cli_heal.json: each command, its exit status, wall time and last lines, the two
check reports (mean KL, top-1) and heal's history.json, with the sha256 of both texts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from expand.io.embedded import cache_dir
from expand.text import shipped_text, text_sha256
from experiments.benchlib import write_json

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
STEPS = 30


def expand_cli(*args: str) -> dict:
    """Run `python -m expand ARGS` from this checkout; its exit status, wall time and last output lines."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "expand", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    record = {"command": "expand " + " ".join(args), "exit": done.returncode,
              "wall_s": round(time.perf_counter() - start), "output": done.stdout.strip().splitlines()[-3:]}
    print(f"{record['command']}: exit {record['exit']} in {record['wall_s']} s", *record["output"], sep="\n  ",
          flush=True)
    if done.returncode not in (0, 1):  # check exits 1 when the candidate drifts, which it does here
        sys.exit(f"{record['command']} failed:\n{done.stderr[-3000:]}")
    return record


def main() -> None:
    work = Path(tempfile.mkdtemp(dir=cache_dir(), prefix="cli-heal-"))
    deleted, healed = work / "del12", work / "healed"
    commands = [expand_cli("depth", "smollm2", str(deleted), "--layer-spec", "0:12,13:"),
                expand_cli("check", "smollm2", str(deleted), "--text", "python-reference", "--json",
                           str(work / "before.json")),
                expand_cli("heal", str(deleted), str(healed), "--teacher", "smollm2", "--steps", str(STEPS)),
                expand_cli("check", "smollm2", str(healed), "--text", "python-reference", "--json",
                           str(work / "after.json"))]
    before, after = (json.loads((work / f"{n}.json").read_text()) for n in ("before", "after"))
    history = json.loads((healed / "history.json").read_text())
    keys = ("mean_kl", "max_kl", "top1_agreement", "tokens")
    results = {"commands": commands, "texts": {name: text_sha256(shipped_text(name))
                                               for name in ("expand-docs", "python-reference")},
               "check_python_reference": {"before": {k: before[k] for k in keys}, "after": {k: after[k] for k in keys}},
               "heal_history": history, "device": "CPU, 2 cores (no GPU lent)"}
    write_json(HERE / "cli_heal.json", results)
    shutil.rmtree(work)
    print(f"python-reference, mean KL to the base: {before['mean_kl']:.4f} -> {after['mean_kl']:.4f}; top-1 "
          f"{before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}")


if __name__ == "__main__":
    main()
