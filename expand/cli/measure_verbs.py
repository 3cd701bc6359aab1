"""Verbs that measure: `check` (is the candidate the same function?), `ablate` (a sweep of depth variants)
and `demo` (the main job on the embedded SmolLM2)."""

from __future__ import annotations

from rich.text import Text

from expand.cli.options import (
    LAYER_SPEC_HELP,
    SWEEP_HELP,
    add_eval_options,
    add_mesh_options,
    claim_output,
    eval_tokens,
    load_on_mesh,
    positive_int,
    verb,
)
from expand.distributed import on_writer
from expand.report import console, format_value, print_reports, print_table


def cmd_check(args) -> int:
    from expand.check import check
    from expand.io.atomic import atomic_file
    from expand.report import plot_layers

    if args.candidate is not None and args.layer_spec is not None:
        raise ValueError("give a CANDIDATE model or --layer-spec (a virtual candidate on the base), not both")
    if args.candidate is None and args.layer_spec is None:
        raise ValueError("give a CANDIDATE model to compare with BASE, or --layer-spec S for a depth plan run "
                         "virtually on BASE")
    reports = [f for f in (args.json, args.plot) if f]
    inputs = [read for f in reports for read in claim_output(f, args, args.base, args.candidate)]
    base = load_on_mesh(args.base, args)
    if args.layer_spec is not None:
        from expand.surgery.plan import plan_from_layer_spec

        candidate = plan_from_layer_spec(args.layer_spec, base.config.num_hidden_layers)
    else:
        candidate = load_on_mesh(args.candidate, args)
    report = check(base, candidate, tokens=eval_tokens(base, args), dtype=args.dtype)
    print_reports([report], f"{args.base} vs {report.candidate} ({args.dtype}, tokens {report.tokens})")
    drifting = [layer for layer in report.layers if layer["drifted"]]
    if report.verdict == "non-finite":
        where = ("the base itself is non-finite" if not report.base_is_finite else
                 f"{report.nonfinite_positions} positions have a NaN or inf logit")
        if report.nonfinite_weights:
            where += f"; NaN or inf weights in {', '.join(report.nonfinite_weights)}"
        slot = report.first_nonfinite_slot
        first = ("" if slot is None else " (embeddings)" if slot == -1 else
                 f"; the first non-finite hidden state is the output of slot {slot} "
                 f"(base layer {report.layers[slot]['base_layer']})")
        console.print(Text(f"non-finite: {where}{first}; no number of this report can be trusted", style="red"))
    elif report.first_drift_layer is not None:
        console.print(Text(f"first layer out of the floor: slot {report.first_drift_layer} "
                           f"(base layer {report.layers[report.first_drift_layer]['base_layer']}); "
                           f"{len(drifting)} of {len(report.layers)} slots drift"))
    def write_reports() -> None:
        if args.json:
            with atomic_file(args.json, args.force, inputs=inputs) as tmp:
                report.write_json(tmp)
        if args.plot:
            with atomic_file(args.plot, args.force, inputs=inputs) as tmp:
                plot_layers([report], tmp)

    on_writer(write_reports)
    return 0 if report.preserved else 1


def cmd_ablate(args) -> int:
    from expand.ablate import METRICS, ablate, parse_sweep
    from expand.io.atomic import atomic_dir

    inputs = claim_output(args.out, args, args.model) if args.out else []
    model = load_on_mesh(args.model, args)
    parse_sweep(args.sweep, model.config.num_hidden_layers)  # refuse a bad sweep before tokenizing or computing
    tokens = eval_tokens(model, args)
    table = ablate(model, args.sweep, tokens, batch_size=args.batch_size)
    columns = ["name", "depth", *[m for m in METRICS if m in table.base]]
    rows = [{c: format_value(c, row[c]) for c in columns} for row in [{"name": "base", **table.base}, *table.rows]]
    print_table(rows, f"{args.sweep} on {args.model} ({tokens.shape[0]} x {tokens.shape[1]} tokens)")
    for name, rho in table.correlations.items():
        console.print(Text(f"Spearman {name}: {rho:+.3f}"))
    console.print(Text(f"{len(table.rows)} variants, {table.compilations} compilations of the forward "
                       f"(lengths {table.lengths})"))
    if args.out:
        def write_table() -> list[str]:
            with atomic_dir(args.out, args.force, inputs=inputs) as tmp:
                return table.write(tmp)

        written = on_writer(write_table)
        console.print(Text(f"written to {args.out}/: {', '.join(written or [])}"))
    return 0


def cmd_demo(args) -> int:
    from expand.demo import run_demo

    claim_output(args.out, args, "smollm2")
    return run_demo(args.out, overwrite=args.force, seq_len=args.seq_len, num_sequences=args.num_sequences)


def register(verbs) -> None:
    p = verb(verbs, "check", "is CANDIDATE the same function as BASE? exit 0 preserved, 1 drifted or non-finite, "
             "2 error", LAYER_SPEC_HELP)
    p.add_argument("base", help="the reference model")
    p.add_argument("candidate", nargs="?", help="a model path; or omit it and give --layer-spec")
    p.add_argument("--layer-spec", metavar="SPEC", help="check BASE run virtually through this depth plan")
    add_eval_options(p)
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp64"),
                   help="the dtype both models run in; the floor is measured against the next wider one")
    p.add_argument("--json", metavar="FILE", help="write the report as JSON here")
    p.add_argument("--plot", metavar="PNG", help="write a plot of drift per layer here")
    p.add_argument("--force", action="store_true", help="replace --json and --plot files that exist (never an input)")
    add_mesh_options(p)
    p.set_defaults(run=cmd_check)

    p = verb(verbs, "ablate", "a sweep of depth variants on one copy of the weights (one compile per length)",
             SWEEP_HELP)
    p.add_argument("model", help="the model whose layers are swept")
    p.add_argument("--sweep", required=True, metavar="KIND", help="which variants (below)")
    add_eval_options(p)
    p.add_argument("--batch-size", type=positive_int, metavar="B", help="sequences per forward (default: the largest divisor "
                   "of the sequence count up to 4)")
    p.add_argument("--out", metavar="DIR", help="write results.json, results.csv and PNG plots to this directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    add_mesh_options(p)
    p.set_defaults(run=cmd_ablate)

    p = verb(verbs, "demo", "grow, prune and widen the embedded SmolLM2 and check each variant against it")
    p.add_argument("--out", default="expand-demo", metavar="DIR", help="the report directory")
    p.add_argument("--force", action="store_true", help="replace the report directory if it exists")
    p.add_argument("--seq-len", type=positive_int, default=512, metavar="T", help="tokens per sequence")
    p.add_argument("--num-sequences", type=positive_int, default=4, metavar="B", help="sequences of the default text")
    p.set_defaults(run=cmd_demo)
