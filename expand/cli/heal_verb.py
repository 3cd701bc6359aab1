"""`expand heal`: fine-tune a grown or pruned model (optax), distilling from a teacher."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from expand import io
from expand.cli.options import (LAYER_SPEC_HELP, add_eval_options, add_mesh_options, add_plan_options,
                                claim_output, depth_plan, eval_tokens, load_on_mesh, verb)
from expand.report import console


def cmd_heal(args) -> int:
    from expand.heal import HealOptions, heal
    from expand.io.atomic import refuse_overlap

    options = HealOptions(steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          batch_size=args.batch_size, distill_weight=args.distill_weight, lm_weight=args.lm_weight,
                          train=args.train, shared=args.shared, gates=args.gates, gate_lr=args.gate_lr,
                          checkpoint_every=args.checkpoint_every)
    options.validate()
    inputs = claim_output(args.out, args, args.model, args.teacher)
    checkpoints = Path(args.out).with_name(Path(args.out).name + ".checkpoints")
    refuse_overlap(checkpoints, inputs)
    model = load_on_mesh(args.model, args)
    plan = depth_plan(model.config, args, required=False)
    teacher = load_on_mesh(args.teacher, args) if args.teacher else None
    tokens = eval_tokens(model, args)
    result = heal(model, tokens, plan, teacher, options, checkpoints, resume=args.resume)
    healed = result.export()
    io.save(args.out, healed.config, healed.params, tokenizer_from=model, overwrite=args.force,
            provenance=healed.provenance, inputs=inputs)
    result.write_history(args.out)
    first, last = result.history[0], result.history[-1]
    console.print(Text(f"healed {options.steps} steps on {tokens.shape[0]} x {tokens.shape[1]} tokens: loss "
                       f"{first['loss']:.4f} -> {last['loss']:.4f} (LM {first['lm']:.4f} -> {last['lm']:.4f}, KL "
                       f"{first['kl']:.4f} -> {last['kl']:.4f}); wrote {args.out} (HF, history.json, loss.png), "
                       f"orbax checkpoints in {checkpoints}"))
    return 0


def register(verbs) -> None:
    p = verb(verbs, "heal", "fine-tune a grown or pruned model with optax, distilling from a teacher",
             LAYER_SPEC_HELP)
    p.add_argument("model", help="the model to heal, or the base when a plan is given")
    p.add_argument("out", help="the directory to write (orbax checkpoints go to OUT.checkpoints)")
    add_plan_options(p)
    p.add_argument("--teacher", metavar="MODEL", help="distill from this model's logits (usually the base)")
    add_eval_options(p, seq_len=256, num_sequences=None)
    p.add_argument("--steps", type=int, default=100, metavar="N", help="optimizer steps")
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (AdamW)")
    p.add_argument("--warmup", type=int, default=10, metavar="N", help="steps of linear warmup from 0 to --lr")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    p.add_argument("--batch-size", type=int, default=4, metavar="B", help="sequences per step")
    p.add_argument("--train", default="all", metavar="all|new|slots:SPEC", help="which slots' weights train: all; "
                   "new (the slots whose layer already ran); or slots:SPEC, a layer spec over the slots")
    p.add_argument("--shared", default="virtual", choices=("virtual", "decoupled"),
                   help="virtual: duplicated slots share weights (update / k); decoupled: each slot owns a copy")
    p.add_argument("--gates", action="store_true", help="a gate (init 0) on each new slot's residual branches")
    p.add_argument("--gate-lr", type=float, help="the gates' own peak learning rate (default: --lr)")
    p.add_argument("--distill-weight", type=float, default=1.0, help="weight of KL(teacher || student)")
    p.add_argument("--lm-weight", type=float, default=1.0, help="weight of the next-token cross-entropy")
    p.add_argument("--checkpoint-every", type=int, default=50, metavar="N", help="orbax checkpoint interval")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT.checkpoints")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input)")
    add_mesh_options(p)
    p.set_defaults(run=cmd_heal)
