"""The run: checks of the inputs, the training loop with held-out evaluation and the kept weights, orbax
checkpoints, and resuming (an interrupted run, or a finished one extended to more steps)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from expand.container import Model
from expand.heal.data import batch_at, check_rows, digest, split_held_out
from expand.heal.loss import make_evaluate, make_step, teacher_views
from expand.heal.optimizer import make_optimizer
from expand.heal.options import HealDiverged, HealOptions, resume_mismatch
from expand.heal.result import HealResult
from expand.heal.student import first_nonfinite, make_student
from expand.params import Params
from expand.sharding import data_parallel
from expand.surgery.plan import LayerPlan


TOKEN_DIGESTS = {"train_tokens": "training", "held_out_tokens": "held-out"}  # checkpoint meta key: which tokens


@dataclasses.dataclass
class RunState:
    """Everything a checkpoint holds: the weights and optimizer state after `step` optimizer steps, the
    kept-best weights and their step, and the logs so far."""

    step: int
    params: Params
    opt_state: object
    best: Params | None
    best_step: int
    history: list[dict]
    held_out: list[dict]


def copy(tree):
    """Fresh buffers with the same values, placed explicitly where they are (the training step donates its
    inputs, and returns 'committed' arrays: an uncommitted input would make it compile twice)."""
    return jax.tree_util.tree_map(lambda x: jax.device_put(x, x.sharding, may_alias=False), tree)


def place_with(tree, params: Params):
    """Every array of `tree` committed to the params' devices: where it is when it already spans them
    (optimizer moments made like their params), replicated over them otherwise (scalar step counts)."""
    reference = next(iter(params.values())).sharding
    replicated = reference
    if isinstance(reference, jax.sharding.NamedSharding):
        replicated = jax.sharding.NamedSharding(reference.mesh, jax.sharding.PartitionSpec())

    def put(x):
        return jax.device_put(x, x.sharding if x.sharding.device_set == reference.device_set else replicated)

    return jax.tree_util.tree_map(put, tree)


def refuse_nonfinite(model: Model | None, role: str) -> None:
    if model is None:
        return
    bad = first_nonfinite(model.params)
    if bad is not None:
        raise ValueError(f"the {role}'s weights are not finite before healing: {bad}. Healing cannot repair "
                         f"them; load the {role} again from a good checkpoint (`expand check` shows where a "
                         "model stops being finite)")


def _manager(directory: Path):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(directory.resolve(), options=ocp.CheckpointManagerOptions(max_to_keep=2))


def _save(manager, state: RunState, meta: dict) -> None:
    import orbax.checkpoint as ocp

    arrays = {"params": state.params, "opt_state": state.opt_state}
    if state.best is not None:
        arrays["best"] = state.best
    logs = {"history": state.history, "held_out": state.held_out, "best_step": state.best_step}
    manager.save(state.step, args=ocp.args.Composite(state=ocp.args.StandardSave(arrays),
                                                     meta=ocp.args.JsonSave({**meta, **logs})))
    manager.wait_until_finished()


def _restore(manager, directory, state: RunState, meta: dict, options: HealOptions) -> RunState:
    """The latest checkpoint's state, after checking that it belongs to this run (same options but the
    number of steps, same data, same kind of teacher)."""
    import orbax.checkpoint as ocp

    step = manager.latest_step()
    saved = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    if not all(key in saved for key in ("options", "teacher", *TOKEN_DIGESTS)):
        raise ValueError(f"cannot resume the run in {directory}: its checkpoints were written by an earlier version "
                         "of expand heal; start a new run (another OUT, or delete that directory)")
    problem = resume_mismatch(saved["options"], options)
    if problem is None and saved["teacher"] != meta["teacher"]:
        problem = ("the checkpoints were made " + ("with" if saved["teacher"] else "without") +
                   " a teacher; run again " + ("with" if saved["teacher"] else "without") + " --teacher")
    for key, what in TOKEN_DIGESTS.items():
        if problem is None and saved[key] != meta[key]:
            problem = (f"the {what} tokens differ from those the checkpoints were made on; give the same text, "
                       "--seq-len, --num-sequences (and --eval-text) as that run")
    if problem is None and step > options.steps:
        problem = (f"the checkpoints are at step {step}, past the {options.steps} steps asked for; pass --steps "
                   f"{step} or more")
    if problem is not None:
        raise ValueError(f"cannot resume the run in {directory}: {problem}")
    arrays = {"params": state.params, "opt_state": state.opt_state}
    if state.best is not None:
        arrays["best"] = state.best
    abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, arrays)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    return RunState(step, restored["params"], restored["opt_state"], restored.get("best"), saved["best_step"],
                    saved["history"], saved["held_out"])


def heal(model: Model, tokens: np.ndarray, plan: LayerPlan | None = None, teacher: Model | None = None,
         options: HealOptions = HealOptions(), checkpoint_dir: str | Path | None = None, resume: bool = False,
         on_step: Callable[[int, dict], None] | None = None, eval_tokens: np.ndarray | None = None) -> HealResult:
    """Fine-tune `model` run through `plan` (default: as it is) on token windows (S, T).

    teacher: the frozen model the student is distilled towards (by default the objective is
        KL(teacher || student) alone, see HealOptions.lm_weight); None trains on the LM loss.
    eval_tokens: held-out windows (S', T'); None holds out the last options.held_out of `tokens`. They are
        evaluated before step 1, every options.eval_every steps and after the last; options.keep picks the
        weights returned.
    checkpoint_dir: orbax checkpoints every options.checkpoint_every steps and after the last; with
        resume=True the run continues from the latest one (same options but `steps`, same data), also past
        the end of a finished run: the result equals an uninterrupted run of options.steps bit for bit.
    on_step(step, logs): called after every step (logs are floats)."""
    from expand.progress import progress_bar

    student = make_student(model, plan, options)
    options.validate(teacher is not None)
    vocab = student.config.vocab_size
    if teacher is not None and teacher.config.vocab_size != vocab:
        raise ValueError(f"the teacher's vocab ({teacher.config.vocab_size}) differs from the student's ({vocab})")
    tokens = check_rows(tokens, vocab, "training")
    if eval_tokens is None:
        train, held_out = split_held_out(tokens, options.held_out, data_parallel(jax.sharding.get_abstract_mesh()))
    else:
        train, held_out = tokens, check_rows(eval_tokens, vocab, "evaluation")
    if resume and checkpoint_dir is None:
        raise ValueError("resume needs the checkpoint directory of the run to continue")
    refuse_nonfinite(model, "student")
    refuse_nonfinite(teacher if teacher is not model else None, "teacher")
    optimizer = make_optimizer(options, student)
    step_fn = make_step(student, optimizer, options)
    views = None if teacher is None else teacher_views(teacher)
    evaluate = make_evaluate(student, options, views, held_out)
    metric = "kl" if teacher is not None else "lm"
    meta = {"options": options.to_json(), "train_tokens": digest(train), "held_out_tokens": digest(held_out),
            "teacher": teacher is not None}
    params = copy(student.params)
    opt_state = place_with(optimizer.init(params), params)
    state = RunState(0, params, opt_state, student.params if options.keep == "best" else None, 0, [], [])
    manager = _manager(Path(checkpoint_dir)) if checkpoint_dir is not None else None
    if manager is not None and manager.latest_step() is not None:
        if not resume:
            raise ValueError(f"{checkpoint_dir} already holds checkpoints; pass resume=True (CLI: --resume) to "
                             "continue that run, or choose another directory")
        state = _restore(manager, checkpoint_dir, state, meta, options)
    else:
        state.held_out.append({"step": 0, **evaluate(state.params)})
    best_value = next(e[metric] for e in state.held_out if e["step"] == state.best_step)
    try:
        with progress_bar("healing", total=options.steps) as advance:
            advance(state.step)
            while state.step < options.steps:
                batch = jnp.asarray(batch_at(train, state.step, options.batch_size, options.seed))
                view = None if views is None else views(batch)
                params, opt_state, logs, finite = step_fn(state.params, state.opt_state, batch, view)
                step = state.step + 1
                logs = {"step": step, **{k: float(v) for k, v in logs.items()}}
                if not (np.isfinite(logs["loss"]) and bool(finite)):
                    raise HealDiverged(divergence_message(step, logs["loss"], manager, checkpoint_dir))
                state = dataclasses.replace(state, step=step, params=params, opt_state=opt_state)
                state.history.append(logs)
                if on_step is not None:
                    on_step(step, logs)
                if step % options.eval_every == 0 or step == options.steps:
                    evaluation = {"step": step, **evaluate(params)}
                    state.held_out.append(evaluation)
                    if state.best is not None and evaluation[metric] < best_value:
                        state.best, state.best_step, best_value = copy(params), step, evaluation[metric]
                if manager is not None and (step % options.checkpoint_every == 0 or step == options.steps):
                    _save(manager, state, meta)
                advance()
    finally:
        if manager is not None:
            manager.close()
    kept, kept_step = (state.best, state.best_step) if options.keep == "best" else (state.params, state.step)
    lineage = plan.lineage_after(model.lineage()) if plan is not None else model.lineage()
    judged = {e["step"]: e for e in state.held_out}
    operation = {"op": "heal", "teacher": None if teacher is None else str(teacher.source),
                 "tokens": list(train.shape), "tokens_sha256": digest(train),
                 "held_out_tokens": list(held_out.shape), "held_out_tokens_sha256": digest(held_out),
                 "held_out_before": judged[0], "held_out_kept": judged[kept_step], "kept_step": kept_step,
                 **options.to_json()}
    return HealResult(student, kept, state.history, state.held_out, kept_step, options.keep,
                      {"train": list(train.shape), "held_out": list(held_out.shape)}, lineage.with_operation(operation))


def divergence_message(step: int, loss: float, manager, checkpoint_dir) -> str:
    """Why the run stopped at `step` and what to do. The weights were checked finite before step 1, so a
    non-finite value after an update is the optimizer's doing; a non-finite loss at step 1 is not."""
    last = manager.latest_step() if manager is not None else None
    kept = f"the last good checkpoint is step {last} in {checkpoint_dir}" if last is not None else \
        "no checkpoint was written"
    if step == 1 and not np.isfinite(loss):
        return (f"the loss is non-finite at step 1 (loss {loss}), computed from finite weights before any update, "
                "so not because of the learning rate: the model's logits overflow on these tokens (see "
                "`expand check` on the same text)")
    return (f"the loss or the weights became non-finite at step {step} (loss {loss}); {kept}. The weights were "
            "finite before step 1: lower the learning rate (--lr) or raise the warmup (--warmup)")
