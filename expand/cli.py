"""The `expand` command line: each verb is one library call plus printing.

Exit status: 0 success (for `check`: preserved), 1 `check` found drift, 2 an error (bad input, with a
message naming the problem and the fix).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax.numpy as jnp
from rich.console import Console
from rich.table import Table

from expand import io
from expand.config import ConfigError
from expand.heal import HealDiverged
from expand.io.atomic import OutputExistsError
from expand.io.safetensors import CheckpointError
from expand.params import param_count

console = Console(width=None if sys.stdout.isatty() else 150)
DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16, "fp64": jnp.float64, "float64": jnp.float64}


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# ---- show --------------------------------------------------------------------------------------------


def cmd_show(args) -> int:
    from expand.show import describe

    info = describe(args.model, layer_spec=args.layer_spec, recipe=args.recipe)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(title=str(args.model), show_header=False)
    for key, value in info["table"]:
        table.add_row(key, value)
    console.print(table)
    return 0


# ---- generate ----------------------------------------------------------------------------------------


def cmd_generate(args) -> int:
    from expand.generate import generate
    from expand.surgery.layerspec import parse_layer_spec
    from expand.text import chat_prompt

    model = load_on_mesh(args.model, args, dtype=parse_dtype(args.dtype))
    tokenizer = io.load_tokenizer(model)
    prompt = chat_prompt(tokenizer, args.prompt, args.raw)
    layer_ids = None if args.layer_spec is None else parse_layer_spec(args.layer_spec,
                                                                        model.config.num_hidden_layers)
    produced: list[int] = []
    shown = ""

    def stream(row: int, token: int) -> None:
        nonlocal shown
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    generate(model.params, model.config, [prompt], args.max_new_tokens, layer_ids=layer_ids,
             temperature=args.temperature, top_p=args.top_p, seed=args.seed, on_token=stream)
    sys.stdout.write("\n")
    return 0


# ---- convert -----------------------------------------------------------------------------------------


def cmd_convert(args) -> int:
    io.refuse_same_path(io.resolve(args.src), args.out)
    io.refuse_existing(args.out, args.force)
    model = io.load(args.src, dtype=parse_dtype(args.dtype))
    io.save(args.out, model.config, model.params, tokenizer_from=model, format=args.format,
            overwrite=args.force, provenance=model.provenance)
    console.print(f"wrote {args.out} ({args.format}, {args.dtype}, {param_count(model.config):,} parameters)")
    return 0


# ---- depth -------------------------------------------------------------------------------------------


def depth_plan(config, args):
    """The LayerPlan a depth command asks for: --layer-spec, --recipe or --llama-pro, then --identity."""
    from expand.surgery.plan import llama_pro_plan, with_identity
    from expand.show import plan_for

    chosen = [a for a in (args.layer_spec, args.recipe, args.llama_pro) if a is not None]
    if len(chosen) != 1:
        raise ValueError("give exactly one of --layer-spec, --recipe, --llama-pro")
    if args.llama_pro is not None:
        plan = llama_pro_plan(config.num_hidden_layers, args.llama_pro)
    else:
        plan = plan_for(config, args.layer_spec, args.recipe)
    if args.identity == "duplicates":
        plan = with_identity(plan, duplicates=True)
    elif args.identity:
        plan = with_identity(plan, slots=parse_int_list(args.identity, "--identity"))
    return plan


def parse_int_list(text: str, option: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{option} takes 'duplicates' or comma-separated slot numbers, got {text!r}") from None


def cmd_depth(args) -> int:
    from expand.surgery.depth import depth_to_disk, recipe_models

    config = io.read_config(args.model)
    plan = depth_plan(config, args)
    out = depth_to_disk(args.model, args.out, plan, models=recipe_models(plan, args.model),
                        dtype=parse_dtype(args.dtype) if args.dtype else None,
                        max_shard_size=args.max_shard_size, overwrite=args.force)
    console.print(f"wrote {out}: {plan.num_layers} layers ({plan.layer_map()}), "
                  f"{param_count(config, plan.layer_ids):,} parameters")
    return 0


# ---- widen -------------------------------------------------------------------------------------------


SIZE_OPTIONS = {"hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}


def widen_sizes(args) -> dict:
    """Target sizes from --like (another config) and the explicit size options, which win."""
    sizes = {}
    if args.like:
        like = io.read_config(args.like)
        sizes = {field: getattr(like, field) for field in SIZE_OPTIONS.values()}
    for option, field in SIZE_OPTIONS.items():
        if getattr(args, option) is not None:
            sizes[field] = getattr(args, option)
    if not sizes:
        raise ValueError("give the target sizes: --like CONFIG_OR_MODEL and/or --hidden-size, --num-heads, "
                         "--num-kv-heads, --intermediate-size")
    return sizes


def cmd_widen(args) -> int:
    from expand.show import human_count
    from expand.surgery.width import widen_to_disk, width_plan

    config = io.read_config(args.model)
    options = dict(mode=args.mode, fill=args.fill, triangular=args.triangular, noise=args.noise, seed=args.seed,
                   donor_layers=args.donor_layers)
    donor = io.read_config(args.donor) if args.donor else None
    sizes = widen_sizes(args)
    plan = width_plan(config, donor=donor, **sizes, **options)
    new = plan.config
    table = Table(title=f"{args.model} widened ({args.mode})")
    for column in ("", "base", "widened"):
        table.add_column(column)
    for label, field in [("hidden size", "hidden_size"), ("attention heads", "num_attention_heads"),
                         ("kv heads", "num_key_value_heads"), ("intermediate size", "intermediate_size"),
                         ("head_dim", "head_dim"), ("layers", "num_hidden_layers"), ("rms_norm_eps", "rms_norm_eps")]:
        table.add_row(label, str(getattr(config, field)), str(getattr(new, field)))
    before, after = param_count(config), param_count(new)
    table.add_row("parameters", f"{before:,} ({human_count(before)})", f"{after:,} ({human_count(after)})")
    console.print(table)
    if args.dry_run:
        return 0
    if args.out is None:
        raise ValueError("give OUT (or --dry-run to see the shapes only)")
    widen_to_disk(args.model, args.out, donor=args.donor, dtype=parse_dtype(args.dtype) if args.dtype else None,
                  max_shard_size=args.max_shard_size, overwrite=args.force, **sizes, **options)
    console.print(f"wrote {args.out}")
    return 0


# ---- check -------------------------------------------------------------------------------------------


def print_reports(reports, title: str) -> None:
    from expand.check import summary_row

    rows = [summary_row(r) for r in reports]
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="left" if column == "candidate" else "right")
    for row in rows:
        style = "green" if row["verdict"] == "preserved" else "red"
        table.add_row(*[f"[{style}]{v}[/]" if k == "verdict" else v for k, v in row.items()])
    console.print(table)


def cmd_check(args) -> int:
    from expand.check import check, plot_layers

    if (args.candidate is None) == (args.layer_spec is None):
        raise ValueError("give a CANDIDATE model or --layer-spec (a virtual candidate on the base), not both")
    base = load_on_mesh(args.base, args)
    candidate = None if args.candidate is None else load_on_mesh(args.candidate, args)
    if args.layer_spec is not None:
        from expand.surgery.plan import plan_from_layer_spec

        candidate = plan_from_layer_spec(args.layer_spec, base.config.num_hidden_layers)
    report = check(base, candidate, tokens=eval_tokens(base, args), dtype=args.dtype)
    print_reports([report], f"{args.base} vs {report.candidate} ({args.dtype}, tokens {report.tokens})")
    drifting = [layer for layer in report.layers if layer["drifted"]]
    if report.first_drift_layer is not None:
        console.print(f"first layer out of the floor: slot {report.first_drift_layer} "
                      f"(base layer {report.layers[report.first_drift_layer]['base_layer']}); "
                      f"{len(drifting)} of {len(report.layers)} slots drift")
    if args.json:
        report.write_json(args.json)
    if args.plot:
        plot_layers([report], args.plot)
    return 0 if report.preserved else 1


def load_on_mesh(path, args, dtype=jnp.float32):
    """io.load, with each tensor placed straight into its shards when --mesh is given (after
    jax.distributed.initialize when --coordinator is)."""
    if not args.mesh:
        return io.load(path, dtype=dtype)
    from expand.sharding import initialize_distributed, make_mesh, parse_mesh, placement

    if args.coordinator or args.num_processes is not None:
        initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    mesh = make_mesh(parse_mesh(args.mesh))
    return io.load(path, dtype=dtype, placement=placement(io.read_config(path), mesh))


def eval_tokens(model, args):
    """The (sequences, length) eval batch of a verb with --text / --random-tokens / --seq-len /
    --num-sequences."""
    from expand.text import random_batch, read_texts, token_batch

    if args.random_tokens:
        return random_batch(model.config.vocab_size, args.seq_len, args.num_sequences or 4)
    return token_batch(model, read_texts(args.text) if args.text else None, args.seq_len, args.num_sequences)


def cmd_ablate(args) -> int:
    from expand.ablate import METRICS, ablate, parse_sweep
    from expand.io.atomic import atomic_dir, refuse_existing

    if args.out:
        refuse_existing(args.out, args.force)
    model = load_on_mesh(args.model, args)
    parse_sweep(args.sweep, model.config.num_hidden_layers)  # refuse a bad sweep before tokenizing or computing
    tokens = eval_tokens(model, args)
    table = ablate(model, args.sweep, tokens, batch_size=args.batch_size)
    columns = ["name", "depth", *[m for m in METRICS if m in table.base]]
    view = Table(title=f"{args.sweep} on {args.model} ({tokens.shape[0]} x {tokens.shape[1]} tokens)")
    for column in columns:
        view.add_column(column, justify="left" if column == "name" else "right")
    for row in [{"name": "base", **table.base}, *table.rows]:
        view.add_row(*[_cell(row[c]) for c in columns])
    console.print(view)
    for name, rho in table.correlations.items():
        console.print(f"Spearman {name}: {rho:+.3f}")
    console.print(f"{len(table.rows)} variants, {table.compilations} compilations of the forward "
                  f"(lengths {table.lengths})")
    if args.out:
        with atomic_dir(args.out, args.force) as tmp:
            written = table.write(tmp)
        console.print(f"written to {args.out}/: {', '.join(written)}")
    return 0


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def cmd_heal(args) -> int:
    from pathlib import Path

    from expand.heal import HealOptions, heal
    from expand.io.atomic import refuse_existing

    options = HealOptions(steps=args.steps, lr=args.lr, warmup=args.warmup, weight_decay=args.weight_decay,
                          batch_size=args.batch_size, distill_weight=args.distill_weight, lm_weight=args.lm_weight,
                          train=args.train, shared=args.shared, gates=args.gates, gate_lr=args.gate_lr,
                          checkpoint_every=args.checkpoint_every)
    options.validate()
    refuse_existing(args.out, args.force)
    model = load_on_mesh(args.model, args)
    chosen = any(a is not None for a in (args.layer_spec, args.recipe, args.llama_pro))
    plan = depth_plan(model.config, args) if chosen or args.identity else None
    teacher = load_on_mesh(args.teacher, args) if args.teacher else None
    tokens = eval_tokens(model, args)
    checkpoints = Path(args.out).with_name(Path(args.out).name + ".checkpoints")
    result = heal(model, tokens, plan, teacher, options, checkpoints, resume=args.resume)
    healed = result.export()
    io.save(args.out, healed.config, healed.params, tokenizer_from=model, overwrite=args.force,
            provenance=healed.provenance)
    result.write_history(args.out)
    first, last = result.history[0], result.history[-1]
    console.print(f"healed {options.steps} steps on {tokens.shape[0]} x {tokens.shape[1]} tokens: loss "
                  f"{first['loss']:.4f} -> {last['loss']:.4f} (LM {first['lm']:.4f} -> {last['lm']:.4f}, KL "
                  f"{first['kl']:.4f} -> {last['kl']:.4f}); wrote {args.out} (HF, history.json, loss.png), "
                  f"orbax checkpoints in {checkpoints}")
    return 0


def cmd_demo(args) -> int:
    from expand.demo import run_demo

    return run_demo(args.out, overwrite=args.force, seq_len=args.seq_len, num_sequences=args.num_sequences)


# ---- the parser --------------------------------------------------------------------------------------


def add_output_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    """Options of every verb that writes a checkpoint directory."""
    p.add_argument("--dtype", help=dtype_help)
    p.add_argument("--max-shard-size", default="2GB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """Options that describe a depth plan (`depth_plan` reads them)."""
    p.add_argument("--layer-spec", help="chatllm.cpp-style spec, e.g. 0:8,4:12,8:16 or 0:10,10:20:2,20:")
    p.add_argument("--recipe", help="a mergekit passthrough YAML (single-model recipes apply to MODEL)")
    p.add_argument("--llama-pro", type=int, metavar="NEW_LAYERS",
                   help="LLaMA-Pro block expansion to NEW_LAYERS layers (identity copies)")
    p.add_argument("--identity", metavar="duplicates|SLOTS",
                   help="identity-initialise (zero o_proj and down_proj) the duplicated slots or the listed slots")


def add_mesh_options(p: argparse.ArgumentParser) -> None:
    """Options of every verb that runs the model: where its weights live."""
    p.add_argument("--mesh", help="shard the weights over a device mesh, e.g. fsdp=8 or fsdp=2,tp=4")
    p.add_argument("--coordinator", help="multi-host: HOST:PORT of process 0 (jax.distributed)")
    p.add_argument("--num-processes", type=int, help="multi-host: number of processes")
    p.add_argument("--process-id", type=int, help="multi-host: this process's index")


def add_eval_options(p: argparse.ArgumentParser) -> None:
    """Options of every verb that evaluates on a token batch."""
    p.add_argument("--text", nargs="+", help="text files, or a named text: expand-docs (the default, about 8k "
                                             "tokens) or python-reference (about 110k tokens)")
    p.add_argument("--random-tokens", action="store_true", help="use random tokens instead of text")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-sequences", type=int, default=4)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="expand", description=__doc__.splitlines()[0])
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("show", help="architecture, parameter count and size of a model (config.json is enough)")
    p.add_argument("model", help="HF directory, .gguf file, orbax directory, or 'smollm2'")
    p.add_argument("--layer-spec", help="show the model this layer spec would build (e.g. 0:8,4:12,8:16)")
    p.add_argument("--recipe", help="show the model this mergekit passthrough recipe would build")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_show)

    p = verbs.add_parser("generate", help="continue a prompt, streaming tokens")
    p.add_argument("model")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer-spec", help="run a depth plan virtually (shared weights), e.g. 0:10,10:20:2,20:")
    p.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    p.add_argument("--dtype", default="fp32")
    add_mesh_options(p)
    p.set_defaults(run=cmd_generate)

    p = verbs.add_parser("convert", help="GGUF / HF / orbax -> HF or orbax")
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--format", choices=("hf", "orbax"), default="hf")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    p.set_defaults(run=cmd_convert)

    p = verbs.add_parser("depth", help="duplicate, delete or reorder layers into a new checkpoint (streamed)")
    p.add_argument("model", help="source model (for a multi-model recipe: the first slice's model)")
    p.add_argument("out")
    add_plan_options(p)
    add_output_options(p, "output dtype (default: the recipe's, else the source's)")
    p.set_defaults(run=cmd_depth)

    p = verbs.add_parser("widen", help="grow hidden size, heads and MLP width (streamed; exact by default)")
    p.add_argument("model")
    p.add_argument("out", nargs="?")
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-kv-heads", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--like", help="take the target sizes from this model or config directory")
    p.add_argument("--donor", help="a wider model of the same family whose weights fill the new blocks")
    p.add_argument("--donor-layers", help="'proportional' when the donor has another depth")
    p.add_argument("--mode", default="exact", choices=("exact", "frankenllama", "zero-norm", "duplicate"))
    p.add_argument("--triangular", action="store_true", help="frankenllama: new rows also read old inputs")
    p.add_argument("--fill", default="random", choices=("random", "zeros"), help="new values without a donor")
    p.add_argument("--noise", type=float, default=0.0, help="duplicate: zero-sum symmetry-breaking noise")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print shapes and parameter count; write nothing")
    add_output_options(p, "output dtype (default: the source's)")
    p.set_defaults(run=cmd_widen)

    p = verbs.add_parser("check", help="is CANDIDATE the same function as BASE? (exit 0 preserved, 1 drifted)")
    p.add_argument("base")
    p.add_argument("candidate", nargs="?", help="a model path; or omit it and give --layer-spec")
    p.add_argument("--layer-spec", help="check BASE run virtually with this layer spec")
    add_eval_options(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp64"))
    p.add_argument("--json", help="write the report as JSON here")
    p.add_argument("--plot", help="write a PNG of drift per layer here")
    add_mesh_options(p)
    p.set_defaults(run=cmd_check)

    p = verbs.add_parser("ablate", help="sweep depth variants on one set of weights (one compile per length)")
    p.add_argument("model")
    p.add_argument("--sweep", required=True,
                   help="delete-one, duplicate-one, delete-block:N, window:W:S, swap-adjacent, prune-greedy[:T], "
                        "prune-bi[:T] or specs:FILE")
    add_eval_options(p)
    p.add_argument("--batch-size", type=int, help="sequences per forward (default: largest divisor up to 4)")
    p.add_argument("--out", help="write results.json, results.csv and PNG plots to this directory")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_mesh_options(p)
    p.set_defaults(run=cmd_ablate)

    p = verbs.add_parser("heal", help="fine-tune a grown or pruned model (optax), distilling from a teacher")
    p.add_argument("model", help="the model to heal, or the base when a plan is given")
    p.add_argument("out")
    add_plan_options(p)
    p.add_argument("--teacher", help="distill from this model's logits (usually the base)")
    add_eval_options(p)
    p.set_defaults(seq_len=256, num_sequences=None)  # train on every full window of the text
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--train", default="all", help="all, new, or slots:SPEC (a layer spec over the slots)")
    p.add_argument("--shared", default="virtual", choices=("virtual", "decoupled"),
                   help="virtual: duplicated slots share weights (update / k); decoupled: each slot owns a copy")
    p.add_argument("--gates", action="store_true", help="a gate (init 0) on each new slot's residual branches")
    p.add_argument("--gate-lr", type=float, help="the gates' own peak learning rate (default: --lr)")
    p.add_argument("--distill-weight", type=float, default=1.0)
    p.add_argument("--lm-weight", type=float, default=1.0)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--resume", action="store_true", help="continue from OUT.checkpoints")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_mesh_options(p)
    p.set_defaults(run=cmd_heal)

    p = verbs.add_parser("demo", help="grow, prune and widen the embedded SmolLM2 and check each variant")
    p.add_argument("--out", default="expand-demo", help="report directory")
    p.add_argument("--force", action="store_true", help="replace the report directory if it exists")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--num-sequences", type=int, default=4)
    p.set_defaults(run=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    # expand needs transformers only for configs and tokenizers; its advice to install PyTorch is noise here
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, CheckpointError, ConfigError, OutputExistsError, HealDiverged) as e:
        Console(stderr=True, soft_wrap=True).print(f"[bold red]error:[/] {e}", highlight=False)
        return 2


if __name__ == "__main__":
    sys.exit(main())
