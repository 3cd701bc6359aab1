"""What a healing run returns (`HealResult`) and how it is written: the healed model, history.json (the
training and held-out curves) and loss.png, all into one directory that appears whole or not at all."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from expand.container import Model
from expand.heal.student import Student, export
from expand.params import Params
from expand.provenance import Provenance


@dataclasses.dataclass
class HealResult:
    """student: what trained; params: the kept weights (`keep`: "best", those of the held-out evaluation
    with the lowest KL to the teacher, or LM loss without one; "last": the last step's); kept_step: their
    step (0 = the student before training); history: logs per training step; held_out: one entry per
    held-out evaluation ({"step", "lm", and with a teacher "kl", "top1"}), the first before step 1;
    windows: the shapes of the training and held-out token windows; provenance: the healed model's lineage
    (the plan's slot -> base layer map, the run in its history)."""

    student: Student
    params: Params
    history: list[dict]
    held_out: list[dict]
    kept_step: int
    keep: str
    windows: dict
    provenance: Provenance

    @property
    def metric(self) -> str:
        """The held-out number `keep` judges by: "kl" with a teacher, "lm" without."""
        return "kl" if "kl" in self.held_out[0] else "lm"

    @property
    def before(self) -> dict:
        return self.held_out[0]

    @property
    def kept(self) -> dict:
        """The held-out evaluation of the kept weights."""
        return next(e for e in self.held_out if e["step"] == self.kept_step)

    @property
    def improved(self) -> bool:
        """Whether the kept weights are better on held-out text than the student before training."""
        return self.kept[self.metric] < self.before[self.metric]

    def verdict(self) -> str:
        """One sentence: did the held-out KL to the teacher (LM loss without one) go down, and what was kept."""
        what = "KL to the teacher" if self.metric == "kl" else "LM loss"
        before, kept = self.before, self.kept
        numbers = f"{before[self.metric]:.4f} -> {kept[self.metric]:.4f}"
        if self.metric == "kl":
            numbers += f" (top-1 {before['top1']:.1%} -> {kept['top1']:.1%}, LM loss {before['lm']:.3f} -> " \
                       f"{kept['lm']:.3f})"
        which = f"kept step {self.kept_step}" + (f", the best of {len(self.held_out)} evaluations"
                                                  if self.keep == "best" else ", the last")
        if self.improved:
            return f"held-out {what} went down: {numbers}; {which}"
        if self.kept_step == 0:
            return f"held-out {what} did not go down: no evaluation beat step 0 ({before[self.metric]:.4f}); " \
                   f"kept step 0, the model as it was before healing"
        return f"held-out {what} did not go down: {numbers}; {which}"

    def export(self) -> Model:
        """The healed model as a plain Llama (gates folded, plan materialized)."""
        config, params = export(self.student, self.params)
        return Model(config, params, source="healed", provenance=self.provenance)

    def write_history(self, directory: str | Path) -> None:
        """history.json ({"train": per-step logs, "held_out": evaluations, "keep", "kept_step"}) and
        loss.png (training loss terms and held-out curves against step) into `directory`."""
        directory = Path(directory)
        record = {"train": self.history, "held_out": self.held_out, "keep": self.keep, "kept_step": self.kept_step,
                  "windows": self.windows}
        (directory / "history.json").write_text(json.dumps(record, indent=2) + "\n")
        plot_history(self.history, self.held_out, self.kept_step, directory / "loss.png")

    def save(self, out: str | Path, tokenizer_from=None, overwrite: bool = False, inputs=()) -> Path:
        """The healed model (HF safetensors), history.json and loss.png, written into one temporary directory
        renamed to `out` when all of it is there: an interrupted save leaves no `out`. inputs: paths the
        caller read, which `out` may not be, contain or lie inside."""
        from expand.io import save

        healed = self.export()
        return save(out, healed.config, healed.params, tokenizer_from, overwrite=overwrite,
                    provenance=healed.provenance, inputs=inputs, extra=self.write_history)


def plot_history(history: list[dict], held_out: list[dict], kept_step: int, path: Path) -> None:
    """Left: the training loss and its terms per step (each on its own batch). Right: the held-out curves
    (KL to the teacher and LM loss, and top-1 agreement on a second axis), the kept step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train, judged) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [h["step"] for h in history]
    for key, label in (("loss", "loss (objective)"), ("lm", "LM cross-entropy"), ("kl", "KL(teacher || student)")):
        if any(h[key] > 0 for h in history):
            train.plot(steps, [h[key] for h in history], label=label)
    train.set(xlabel="step", ylabel="nats per token", yscale="log", title="training batches")
    train.legend(fontsize=8)
    eval_steps = [e["step"] for e in held_out]
    for key, label in (("kl", "KL(teacher || student)"), ("lm", "LM cross-entropy")):
        if key in held_out[0]:
            judged.plot(eval_steps, [e[key] for e in held_out], "o-", label=label)
    judged.axvline(kept_step, color="grey", linestyle=":", label=f"kept (step {kept_step})")
    judged.set(xlabel="step", ylabel="nats per token", yscale="log", title="held-out windows")
    judged.legend(fontsize=8, loc="upper left")
    if "top1" in held_out[0]:
        agreement = judged.twinx()
        agreement.plot(eval_steps, [100 * e["top1"] for e in held_out], "s--", color="tab:green")
        agreement.set_ylabel("top-1 agreement with the teacher (%, squares)", color="tab:green")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
