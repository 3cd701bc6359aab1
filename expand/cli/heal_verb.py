"""`expand heal`: fine-tune a grown or pruned model (optax) towards a teacher, judged on held-out text."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from expand.cli.options import (
    LAYER_SPEC_HELP,
    add_eval_options,
    add_mesh_options,
    add_plan_options,
    claim_output,
    depth_plan,
    eval_tokens,
    load_on_mesh,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    text_windows,
    verb,
)
from expand.report import console


def objective(options, has_teacher: bool) -> str:
    lm, kl = options.loss_weights(has_teacher)
    if not kl:
        return "LM cross-entropy"
    return "KL(teacher || student)" if not lm else f"{lm:g} x LM cross-entropy + {kl:g} x KL(teacher || student)"


def cmd_heal(args) -> int:
    from expand.heal import HealOptions, heal
    from expand.io.atomic import refuse_overlap

    options = HealOptions(steps=args.steps, lr=args.lr, warmup=args.warmup, decay_steps=args.decay_steps,
                          weight_decay=args.weight_decay, batch_size=args.batch_size, seed=args.seed,
                          distill_weight=args.distill_weight, lm_weight=args.lm_weight, train=args.train,
                          shared=args.shared, gates=args.gates, gate_lr=args.gate_lr, held_out=args.held_out,
                          eval_every=args.eval_every, keep=args.keep, checkpoint_every=args.checkpoint_every,
                          remat=args.remat, loss_chunk=args.loss_chunk)
    options.validate(args.teacher is not None)
    checkpoints = Path(args.out).with_name(Path(args.out).name + ".checkpoints")
    if args.resume and not checkpoints.is_dir():
        raise ValueError(f"--resume: there is no run to continue in {checkpoints}; leave out --resume to start one")
    overwrite = args.force or args.resume  # a resumed run replaces its own earlier result
    inputs = claim_output(args.out, args, args.model, args.teacher, overwrite=overwrite)
    refuse_overlap(checkpoints, inputs)
    model = load_on_mesh(args.model, args)
    plan = depth_plan(model.config, args, required=False)
    teacher = load_on_mesh(args.teacher, args) if args.teacher else None
    tokens = eval_tokens(model, args)
    held_out = None
    if args.eval_text:
        held_out = text_windows(model, args.eval_text, args.seq_len, args.eval_sequences, "--eval-text",
                                "--eval-sequences")
    result = heal(model, tokens, plan, teacher, options, checkpoints, resume=args.resume, eval_tokens=held_out)
    result.save(args.out, tokenizer_from=model, overwrite=overwrite, inputs=inputs)
    train, judged = result.windows["train"], result.windows["held_out"]
    console.print(Text(f"healed {options.steps} steps of {objective(options, teacher is not None)} on {train[0]} x "
                       f"{train[1]} training tokens, judged on {judged[0]} x {judged[1]} held-out tokens; wrote "
                       f"{args.out} (HF, history.json, loss.png), orbax checkpoints in {checkpoints}"))
    console.print(Text(result.verdict()))
    return 0


def register(verbs) -> None:
    from expand.heal import HealOptions

    d = HealOptions()
    p = verb(verbs, "heal", "fine-tune a grown or pruned model with optax towards a teacher, judged on held-out text",
             LAYER_SPEC_HELP)
    p.add_argument("model", help="the model to heal, or the base when a plan is given")
    p.add_argument("out", help="the directory to write: the healed model, history.json and loss.png, all or nothing "
                   "(orbax checkpoints go to OUT.checkpoints)")
    add_plan_options(p)
    p.add_argument("--teacher", metavar="MODEL", help="the model to heal towards (usually the base): the objective "
                   "becomes KL(teacher || student) and held-out KL and top-1 agreement are reported")
    add_eval_options(p, seq_len=256, num_sequences=None)
    p.add_argument("--eval-text", nargs="+", metavar="FILE", help="held-out text (files or a shipped text) to judge "
                   "on; without it the last --held-out of the training windows are held out")
    p.add_argument("--eval-sequences", type=positive_int, default=8, metavar="B", help="windows of --eval-text to judge on")
    p.add_argument("--held-out", type=float, default=d.held_out, metavar="FRACTION",
                   help="fraction of the windows held out for judgement when no --eval-text is given (at least one)")
    p.add_argument("--eval-every", type=positive_int, default=d.eval_every, metavar="N",
                   help="held-out evaluation interval in steps (also before step 1 and after the last)")
    p.add_argument("--keep", choices=("best", "last"), default=d.keep, help="the weights to write: best (lowest "
                   "held-out KL to the teacher, or LM loss without one, step 0 included) or last")
    p.add_argument("--steps", type=positive_int, default=d.steps, metavar="N", help="optimizer steps")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="AdamW learning rate after the warmup")
    p.add_argument("--warmup", type=non_negative_int, default=d.warmup, metavar="N", help="steps of linear warmup from 0 to --lr; "
                   "the rate then holds (it never depends on --steps, so --resume can extend a run)")
    p.add_argument("--decay-steps", type=non_negative_int, metavar="N", help="cosine decay from --lr after the warmup to --lr/10 at "
                   "step N, then held (default: no decay)")
    p.add_argument("--weight-decay", type=non_negative_float, default=d.weight_decay, help="AdamW weight decay")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, metavar="B", help="windows per step")
    p.add_argument("--seed", type=int, default=d.seed, help="the order the training windows are visited in")
    p.add_argument("--train", default=d.train, metavar="all|new|slots:SPEC", help="which slots' weights train: all; "
                   "new (the slots whose layer already ran); or slots:SPEC, a layer spec over the slots")
    p.add_argument("--shared", default=d.shared, choices=("virtual", "decoupled"),
                   help="virtual: duplicated slots share weights (update / k); decoupled: each slot owns a copy")
    p.add_argument("--gates", action="store_true", help="a gate (init 0) on each new slot's residual branches")
    p.add_argument("--gate-lr", type=positive_float, help="the gates' own learning rate (default: --lr)")
    p.add_argument("--distill-weight", type=float, default=d.distill_weight,
                   help="weight of KL(teacher || student) (with --teacher)")
    p.add_argument("--lm-weight", type=float, help="weight of the next-token cross-entropy (default: 0 with "
                   "--teacher, pure distillation; 1 without)")
    p.add_argument("--checkpoint-every", type=positive_int, default=d.checkpoint_every, metavar="N",
                   help="orbax checkpoint interval in steps (also after the last)")
    p.add_argument("--remat", action="store_true", help="recompute each layer's activations in the backward pass: "
                   "less memory, more time")
    p.add_argument("--loss-chunk", type=positive_int, default=d.loss_chunk, metavar="N", help="positions whose vocabulary-"
                   "sized logits exist at once (memory grows with N)")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT.checkpoints (also past its end, "
                   "with a larger --steps), replacing OUT")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input)")
    add_mesh_options(p)
    p.set_defaults(run=cmd_heal)
