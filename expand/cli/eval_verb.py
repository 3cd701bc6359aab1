"""`expand eval`: lm-evaluation-harness tasks on a model, or on depth plans run virtually on one copy of its
weights (no checkpoint written). Needs the `[eval]` extra."""

from __future__ import annotations

from pathlib import Path

from rich.text import Text

from expand.cli.options import (LAYER_SPEC_HELP, SWEEP_HELP, add_mesh_options, load_on_mesh, non_negative_int,
                                positive_float, positive_int, verb)
from expand.report import console, print_table

EVAL_HELP = f"""{LAYER_SPEC_HELP}

{SWEEP_HELP.replace("sweeps (--sweep)", "sweeps (--sweep; the base model is evaluated too)")}
  (prune-greedy and prune-bi choose their variants by measurement: run `expand ablate` for those)

Tasks: any task lm-eval knows (`lm_eval ls tasks`), or local ones: a directory of task YAMLs given with
--include-path (a YAML with `dataset_path: json` and `dataset_kwargs: {{data_files: {{test: FILE}}}}` needs no
hub; FILE is read relative to the working directory, so the tasks in tests/data/lm_eval load their JSONL
with a `custom_dataset` function beside the YAMLs instead). Set HF_DATASETS_OFFLINE=1 to be sure nothing is
fetched."""


def import_harness():
    """expand.harness, or a clear error naming the extra to install."""
    try:
        from expand import harness
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise ValueError("expand eval needs lm-evaluation-harness: pip install 'expand[eval]' "
                         "(lm-eval 0.4.13; no torch needed)") from None
    return harness


def eval_plans(model, args) -> dict:
    """{name: LayerPlan or None}: the model itself, each --layer-spec, a --recipe / --llama-pro plan, or a
    sweep's variants after the base."""
    from expand.surgery.plan import plan_from_layer_spec
    from expand.surgery.request import plan_from_options

    num_layers = model.config.num_hidden_layers
    given = [name for name, value in (("--layer-spec", args.layer_spec), ("--recipe", args.recipe),
                                      ("--llama-pro", args.llama_pro), ("--sweep", args.sweep)) if value]
    if len(given) > 1:
        raise ValueError(f"give one of --layer-spec (repeatable), --recipe, --llama-pro, --sweep (got {' and '.join(given)})")
    if args.sweep:
        from expand.ablate.sweeps import fixed_variants, parse_sweep

        sweep = parse_sweep(args.sweep, num_layers)
        if sweep.kind.startswith("prune"):
            raise ValueError(f"--sweep {args.sweep} picks its variants by measuring KL or Block Influence; run "
                             "`expand ablate` to find them, then evaluate them here with --layer-spec")
        return {"base": None, **{name: plan for name, plan, _ in fixed_variants(sweep, num_layers)}}
    if args.layer_spec:
        return {spec: plan_from_layer_spec(spec, num_layers) for spec in args.layer_spec}
    plan = plan_from_options(model.config, recipe=args.recipe, llama_pro=args.llama_pro, required=False)
    return {"base" if plan is None else plan.description: plan}


def cmd_eval(args) -> int:
    harness = import_harness()
    if args.output:
        from expand.io.atomic import refuse_existing

        refuse_existing(args.output, args.force)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("--tasks is empty: give task names, e.g. --tasks arc_easy,hellaswag")
    if args.include_path and not Path(args.include_path).is_dir():
        raise FileNotFoundError(f"--include-path {args.include_path} is not a directory of task YAML files")
    model = load_on_mesh(args.model, args)
    plans = eval_plans(model, args)
    results = harness.evaluate(model, plans, tasks, include_path=args.include_path, num_fewshot=args.num_fewshot,
                               limit=args.limit, batch_size=args.batch_size, max_length=args.max_length,
                               bootstrap_iters=args.bootstrap_iters)
    rows = harness.results_rows(results)
    columns = [key for key in dict.fromkeys(key for row in rows for key in row) if not key.endswith("_stderr")]
    print_table([{c: format_cell(row.get(c), row.get(f"{c}_stderr")) for c in columns} for row in rows],
                f"lm-eval on {args.model} ({len(plans)} variant{'s' * (len(plans) > 1)})", left=("variant", "task"))
    if args.output:
        from expand.io.atomic import atomic_file

        with atomic_file(args.output, args.force) as tmp:
            tmp.write_text(harness.results_json(results))
        console.print(Text(f"results written to {args.output}"))
    return 0


def format_cell(value, stderr=None) -> str:
    """A metric as `value ± stderr` (4 significant digits), a name as it is, '-' where a task has no such metric."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.4g}" + (f" ± {stderr:.2g}" if stderr is not None else "")


def register(verbs) -> None:
    p = verb(verbs, "eval", "lm-evaluation-harness tasks on a model or on depth plans run virtually (one copy of "
             "the weights, no checkpoint written)", EVAL_HELP)
    p.add_argument("model", help="an HF directory, a .gguf file, an orbax directory written by expand, or "
                   "'smollm2' (embedded)")
    p.add_argument("--tasks", required=True, metavar="T1,T2", help="comma-separated lm-eval task names")
    p.add_argument("--layer-spec", action="append", metavar="SPEC", help="evaluate MODEL run through this layer "
                   "spec; repeat for several plans (one table)")
    p.add_argument("--recipe", metavar="YAML", help="a mergekit passthrough recipe applied to MODEL")
    p.add_argument("--llama-pro", type=positive_int, metavar="NEW_LAYERS", help="LLaMA-Pro expansion to NEW_LAYERS")
    p.add_argument("--sweep", metavar="KIND", help="every variant of an ablate sweep, and the base (below)")
    p.add_argument("--include-path", metavar="DIR", help="a directory of local task YAMLs")
    p.add_argument("--num-fewshot", type=non_negative_int, metavar="K", help="few-shot examples per prompt (default: the "
                   "task's)")
    p.add_argument("--limit", type=positive_float, metavar="N", help="the first N documents of each task (N < 1: a "
                   "fraction); for quick looks, not for reported scores")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="B", help="rows per forward pass")
    p.add_argument("--max-length", type=positive_int, metavar="L", help="context window (default: the config's "
                   "max_position_embeddings)")
    p.add_argument("--bootstrap-iters", type=non_negative_int, default=100000, metavar="N", help="bootstrap resamples for the "
                   "stderr of metrics without a closed form (perplexities); 0 skips them")
    p.add_argument("--output", metavar="FILE", help="write lm-eval's results dict as JSON here ({variant: results} "
                   "for several)")
    p.add_argument("--force", action="store_true", help="replace --output if it exists")
    add_mesh_options(p)
    p.set_defaults(run=cmd_eval)
