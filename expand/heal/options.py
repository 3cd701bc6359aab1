"""What a healing run is asked to do (`HealOptions`), and what stops one (`HealDiverged`)."""

from __future__ import annotations

import dataclasses

KEEP = ("best", "last")
# Options a resumed run may change: the number of steps (the schedule does not depend on it) and how
# often checkpoints are written. Every other option shapes the trajectory and must match.
RESUMABLE_CHANGES = ("steps", "checkpoint_every")


class HealDiverged(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class HealOptions:
    """steps: optimizer steps. lr, warmup: AdamW's learning rate, reached by a linear ramp from 0 over
    `warmup` steps and then held; decay_steps: if given, cosine decay from lr at the end of the warmup to
    lr/10 at step decay_steps, then held (a horizon of its own, so a run extended by --resume follows the
    same schedule). clip: global gradient-norm clipping. batch_size: training windows per step; seed: the
    order the windows are visited in (a permutation drawn from it, repeated every epoch).

    Objective, on each window: lm_weight * CE(student) + distill_weight * KL(teacher || student), means over
    positions. lm_weight=None: 0 with a teacher (pure distillation: healing pursues the teacher), 1
    without one (language modelling). distill_weight applies only with a teacher.

    train, shared, gates, gate_lr: which weights train and how (see `expand.heal`). held_out: the fraction
    of the token windows set aside (the last ones) when no evaluation windows are given; eval_every: held-out
    evaluation interval (also before step 1 and after the last); keep: "best" returns the weights of the
    held-out evaluation with the lowest KL to the teacher (LM loss without one), step 0 included, "last"
    those of the last step. checkpoint_every: orbax interval. remat: recompute each layer's activations in
    the backward pass; loss_chunk: positions whose logits exist at once (memory O(loss_chunk x vocab))."""

    steps: int = 100
    lr: float = 3e-5  # lr and warmup: chosen by experiments/healing/sweep.py (SmolLM2, layer 12 deleted)
    warmup: int = 0
    decay_steps: int | None = None
    weight_decay: float = 0.0
    clip: float = 1.0
    batch_size: int = 4
    seed: int = 0
    distill_weight: float = 1.0
    lm_weight: float | None = None
    train: str = "all"
    shared: str = "virtual"
    gates: bool = False
    gate_lr: float | None = None
    held_out: float = 0.1
    eval_every: int = 10
    keep: str = "best"
    checkpoint_every: int = 50
    remat: bool = False
    loss_chunk: int = 128

    def loss_weights(self, has_teacher: bool) -> tuple[float, float]:
        """(weight of the LM cross-entropy, weight of the KL to the teacher) for a run with or without a
        teacher."""
        if not has_teacher:
            return (1.0 if self.lm_weight is None else self.lm_weight), 0.0
        return (0.0 if self.lm_weight is None else self.lm_weight), self.distill_weight

    def validate(self, has_teacher: bool | None = None) -> None:
        """Refuse inconsistent options; has_teacher=None checks what does not depend on the teacher."""
        if self.shared not in ("virtual", "decoupled"):
            raise ValueError(f"{named('shared')} must be 'virtual' or 'decoupled', got {self.shared!r}")
        if not (self.train in ("all", "new") or self.train.startswith("slots:")):
            raise ValueError(f"{named('train')} must be 'all', 'new' or 'slots:SPEC', got {self.train!r}")
        if self.keep not in KEEP:
            raise ValueError(f"{named('keep')} must be 'best' or 'last', got {self.keep!r}")
        below_one = [named(n) for n in ("steps", "batch_size", "checkpoint_every", "eval_every", "loss_chunk")
                     if getattr(self, n) < 1]
        if below_one:
            raise ValueError(f"{', '.join(below_one)} must be at least 1")
        if self.warmup < 0 or (self.decay_steps is not None and self.decay_steps <= self.warmup):
            raise ValueError(f"{named('warmup')} must be >= 0 and {named('decay_steps')} (when given) above it; "
                             f"got warmup {self.warmup}, decay_steps {self.decay_steps}")
        if not 0 < self.held_out < 1:
            raise ValueError(f"{named('held_out')} is the fraction of windows set aside, in (0, 1); "
                             f"got {self.held_out}")
        if (self.lm_weight is not None and self.lm_weight < 0) or self.distill_weight < 0:
            raise ValueError("the LM and distillation weights must be >= 0")
        if has_teacher is not None and sum(self.loss_weights(has_teacher)) == 0:
            raise ValueError("the LM and distillation weights are both 0: nothing to train on" +
                             ("" if has_teacher else " (without a teacher only the LM loss applies)"))
        if not self.lr > 0:
            raise ValueError(f"{named('lr')}, the learning rate, must be positive, got {self.lr}")
        if self.gate_lr is not None and not (self.gates and self.gate_lr > 0):
            raise ValueError(f"gate_lr={self.gate_lr} needs gates=True (--gates) and a positive value")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def cli_flag(name: str) -> str:
    """The `expand heal` option of a HealOptions field: lm_weight -> --lm-weight."""
    return "--" + name.replace("_", "-")


def named(name: str) -> str:
    """A field as an error message names it, for both callers: `held_out (--held-out)`."""
    return f"{name} ({cli_flag(name)})"


def flag_text(name: str, value) -> str:
    """How the command line says that a field has this value: `--lr 0.0001`, `--gates`, `no --gates`."""
    flag = cli_flag(name)
    if value is None or value is False:
        return f"no {flag}"
    return flag if value is True else f"{flag} {value}"


def resume_mismatch(saved: dict, options: HealOptions) -> str | None:
    """Why a run with `options` cannot continue checkpoints made with the options `saved` (a dict of
    HealOptions fields), naming the first option that differs and the fix; None when it can."""
    wanted = options.to_json()
    for name, value in saved.items():
        if name in RESUMABLE_CHANGES or wanted.get(name) == value:
            continue
        return (f"{name} differs: the checkpoints were made with {flag_text(name, value)} (library: "
                f"{name}={value!r}), this run has {flag_text(name, wanted.get(name))}. Run again with "
                f"{flag_text(name, value)} to continue that run, or heal into another OUT to start a new one")
    return None
