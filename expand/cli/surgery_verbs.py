"""Verbs that write a new checkpoint by surgery, streamed tensor by tensor: `depth`, `widen`, and `grow`
(a depth plan and a widening in one pass)."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table
from rich.text import Text

from expand import io
from expand.cli.options import (
    LAYER_SPEC_HELP,
    add_output_options,
    add_plan_options,
    claim_output,
    depth_plan,
    non_negative_float,
    parse_dtype,
    positive_int,
    verb,
)
from expand.config import Config
from expand.params import param_count
from expand.report import console, format_config_float

SIZE_OPTIONS = {"hidden_size": "hidden_size", "num_heads": "num_attention_heads",
                "num_kv_heads": "num_key_value_heads", "intermediate_size": "intermediate_size"}
# Fields of a --like target that widening does not change: they must agree with the model, or are kept and named.
MUST_AGREE = ("head_dim", "vocab_size")
KEPT = ("rope_theta", "rope_scaling", "max_position_embeddings", "tie_word_embeddings", "attention_bias", "mlp_bias",
        "bos_token_id", "eos_token_id")

MODES_HELP = """\
modes (--mode):
  exact         the same function: new residual coordinates are zero (writers zero in new rows), old
                outputs never read new heads or MLP units, every RMSNorm gain x sqrt(d/d') and rms_norm_eps
                x d/d' (for [x, 0] the mean square over d' is d/d' times that over d); donor or fill values
                go into the readers (q/k/v/gate/up, lm_head), so the new width trains from the first step
  frankenllama  the published Llama-2-13B -> 22B recipe: block-diagonal (block-triangular with
                --triangular) donor blocks, norms extended with donor values, final norm all ones; not the
                same function (RMSNorm now averages over d' coordinates)
  zero-norm     the article's stated intent: as frankenllama, norm gains zero on the new coordinates; still
                not the same function
  duplicate     integer-factor widening (HyperCloning): every axis tiled k times, input copies divided by k;
                the same function; --noise breaks the copies' symmetry and stays exact"""


def width_request(config: Config, args, depth_layers: int) -> dict:
    """Target sizes from --like (another config) and the explicit size options, which win. A --like target
    must agree on head_dim, vocabulary and (unless --width-only) depth: widening changes only widths."""
    sizes: dict = {}
    if args.like:
        like = io.read_config(args.like)
        for field in MUST_AGREE:
            if getattr(like, field) != getattr(config, field):
                raise ValueError(f"--like {args.like} has {field} {getattr(like, field)}, the model "
                                 f"{getattr(config, field)}: widening keeps {field} (heads keep their size; "
                                 "token rows keep their meaning); choose a target with the same value")
        if like.num_hidden_layers != depth_layers and not args.width_only:
            raise ValueError(f"--like {args.like} has {like.num_hidden_layers} layers and the result would have "
                             f"{depth_layers}: widening does not change depth. Add a depth plan with "
                             f"{like.num_hidden_layers} slots (`expand grow ... --layer-spec SPEC --like ...`), "
                             "or pass --width-only to take only its widths")
        sizes = {field: getattr(like, field) for field in SIZE_OPTIONS.values()}
    for option, field in SIZE_OPTIONS.items():
        if getattr(args, option) is not None:
            sizes[field] = getattr(args, option)
    if not sizes:
        raise ValueError("give the target sizes: --like CONFIG_OR_MODEL and/or --hidden-size, --num-heads, "
                         "--num-kv-heads, --intermediate-size")
    return sizes


def unrequested_changes(config: Config, new: Config, args) -> list[str]:
    """What the widening changes, or keeps against a --like target, that the user did not ask for."""
    notes = []
    if new.rms_norm_eps != config.rms_norm_eps:
        notes.append(f"rms_norm_eps {format_config_float(config.rms_norm_eps)} -> "
                     f"{format_config_float(new.rms_norm_eps)}: exact mode multiplies it by d/d' = "
                     f"{config.hidden_size}/{new.hidden_size} (and every norm gain by sqrt(d/d')), so that RMSNorm "
                     "of [x, 0] over d' coordinates equals RMSNorm of x over d")
    if args.like:
        like = io.read_config(args.like)
        for field in KEPT:
            if getattr(like, field) != getattr(config, field):
                notes.append(f"{field} stays {getattr(config, field)!r} (--like {args.like} has "
                             f"{getattr(like, field)!r}): widening changes sizes only")
    return notes


def print_width_table(title: str, config: Config, new: Config) -> None:
    from expand.show import human_count

    table = Table(title=Text(title))
    for column in ("", "base", "widened"):
        table.add_column(column)
    for label, field in [("hidden size", "hidden_size"), ("attention heads", "num_attention_heads"),
                         ("kv heads", "num_key_value_heads"), ("intermediate size", "intermediate_size"),
                         ("head_dim", "head_dim"), ("layers", "num_hidden_layers")]:
        table.add_row(label, str(getattr(config, field)), str(getattr(new, field)))
    table.add_row("rms_norm_eps", format_config_float(config.rms_norm_eps), format_config_float(new.rms_norm_eps))
    before, after = param_count(config), param_count(new)
    table.add_row("parameters", f"{before:,} ({human_count(before)})", f"{after:,} ({human_count(after)})")
    console.print(table)


def recipe_paths(plan, model) -> dict[str, str]:
    """Where each model of a multi-model recipe is, by the recipe's names (each must be a local model); MODEL
    must be one of them: the one whose config, tokenizer and provenance lead."""
    if plan is None or not plan.models:
        return {}
    paths = {}
    for name in plan.models:
        try:
            paths[name] = io.resolve(name)
        except FileNotFoundError:
            raise ValueError(f"recipe model {name!r} is not a local model (a path or an embedded name): fix its "
                             "path in the recipe") from None
    lead = io.resolve(model).resolve()
    if not any(path.resolve() == lead for path in paths.values()):
        raise ValueError(f"{model} is not one of the recipe's models ({', '.join(plan.models)}): give as MODEL the "
                         "one whose config and tokenizer the output should carry")
    return {name: str(path) for name, path in paths.items()}


def width_options(args) -> dict:
    return dict(mode=args.mode, fill=args.fill, triangular=args.triangular, noise=args.noise, seed=args.seed,
                donor_layers=args.donor_layers)


def asks_for_width(args) -> bool:
    return args.like is not None or any(getattr(args, option) is not None for option in SIZE_OPTIONS)


def cmd_surgery(args) -> int:
    """depth, widen and grow: a depth plan (depth, grow), then a widening (widen, grow), in one streamed pass."""
    from expand.surgery.grow import grow_to_disk
    from expand.surgery.width import width_plan

    if args.out is None and not args.dry_run:
        raise ValueError("give OUT (or --dry-run to see the shapes only)")
    config = io.read_config(args.model)
    plan = depth_plan(config, args, required=args.verb == "depth") if args.verb != "widen" else None
    widening = args.verb == "widen" or (args.verb == "grow" and asks_for_width(args))
    if args.verb == "grow" and plan is None and not widening:
        raise ValueError("give a depth plan (--layer-spec, --recipe, --llama-pro), target sizes (--like, "
                         "--hidden-size, ...), or both")
    deep = config if plan is None else config.replace(num_hidden_layers=plan.num_layers)
    if not args.dry_run:
        claim_output(args.out, args, args.model, getattr(args, "donor", None), getattr(args, "like", None),
                     plan and plan.tokenizer_model)
    request = {}
    if widening:
        request = {**width_request(deep, args, deep.num_hidden_layers), **width_options(args)}
        donor = io.read_config(args.donor) if args.donor else None
        new = width_plan(deep, donor=donor, **request).config
        print_width_table(f"{args.model} {'grown' if plan else 'widened'} ({args.mode})", config, new)
        for note in unrequested_changes(deep, new, args):
            console.print(Text(f"note: {note}"))
    elif getattr(args, "donor", None) is not None:
        raise ValueError("--donor fills a widening's new blocks: give target sizes too (--like, --hidden-size, ...)")
    if args.dry_run:
        return 0
    out = grow_to_disk(args.model, args.out, plan=plan, models=recipe_paths(plan, args.model),
                       donor=getattr(args, "donor", None),
                       dtype=parse_dtype(args.dtype) if args.dtype else None, max_shard_size=args.max_shard_size,
                       overwrite=args.force, extra=recorded_check(args.model) if args.check else None, **request)
    written = io.read_config(out)
    layers = f"{written.num_hidden_layers} layers" + (f" ({plan.layer_map()})" if plan else "")
    console.print(Text(f"wrote {out}: {layers}, hidden {written.hidden_size}, {param_count(written):,} parameters"))
    return 0


def recorded_check(model: str):
    """directory -> None: check the written model in `directory` against `model` (expand's default text) and
    record the report in it (`expand.io.card.record_check`); the verdict is printed too."""
    from expand.check import check
    from expand.io.card import record_check
    from expand.report import print_reports
    from expand.text import DEFAULT_TEXT, shipped_text, text_sha256

    def record(directory: Path) -> None:
        name = directory.name.split(".tmp-")[0].lstrip(".")
        report = check(model, directory, text=shipped_text(DEFAULT_TEXT), name=name)
        print_reports([report], f"{name} against {model}")
        record_check(directory, report.to_json(), model, {DEFAULT_TEXT: text_sha256(shipped_text(DEFAULT_TEXT))})

    return record


def add_width_options(p) -> None:
    p.add_argument("--like", metavar="CONFIG", help="take every size from this model or config directory "
                   "(hidden, heads, kv heads, MLP; head_dim, vocabulary and depth must agree)")
    p.add_argument("--width-only", action="store_true", help="with --like: take only its widths when its depth "
                   "differs from the result's")
    p.add_argument("--hidden-size", type=positive_int, metavar="D", help="new hidden size (wins over --like)")
    p.add_argument("--num-heads", type=positive_int, metavar="N", help="new number of query heads (head_dim is kept)")
    p.add_argument("--num-kv-heads", type=positive_int, metavar="M", help="new number of kv heads")
    p.add_argument("--intermediate-size", type=positive_int, metavar="F", help="new MLP width")
    p.add_argument("--donor", metavar="MODEL", help="a wider model of the same family whose weights fill the new "
                   "blocks (cropped to the target sizes)")
    p.add_argument("--donor-layers", metavar="proportional", help="donor layer for base layer l: the same l "
                   "(equal depths) or 'proportional' (floor(l * L_donor / L))")
    p.add_argument("--mode", default="exact", choices=("exact", "frankenllama", "zero-norm", "duplicate"),
                   help="how the new blocks and the norms are set (below)")
    p.add_argument("--triangular", action="store_true", help="frankenllama/zero-norm: new rows also read the old "
                   "inputs (block-triangular instead of block-diagonal)")
    p.add_argument("--fill", default="random", choices=("random", "zeros"), help="new values without a donor: "
                   "normal with each base tensor's std, or zeros")
    p.add_argument("--noise", type=non_negative_float, default=0.0, help="duplicate mode: relative std of zero-sum noise over "
                   "the input copies (keeps the function exact)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random fill and noise")


def add_model_out(p, out_help: str = "the directory to write") -> None:
    p.add_argument("model", help="the source model (HF directory, .gguf, 'smollm2'); for a multi-model recipe, "
                   "the recipe model whose config and tokenizer lead")
    p.add_argument("out", nargs="?", help=out_help + " (not needed with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="print the shapes and parameter counts; write nothing")


def register(verbs) -> None:
    p = verb(verbs, "depth", "duplicate, delete or reorder layers into a new checkpoint (streamed)", LAYER_SPEC_HELP)
    add_model_out(p)
    add_plan_options(p)
    add_output_options(p, "output dtype (default: the recipe's, else the source's)")
    p.set_defaults(run=cmd_surgery)

    p = verb(verbs, "widen", "grow hidden size, heads and MLP width into a new checkpoint (streamed; exact by "
             "default)", MODES_HELP)
    add_model_out(p)
    add_width_options(p)
    add_output_options(p, "output dtype (default: the source's)")
    p.set_defaults(run=cmd_surgery)

    p = verb(verbs, "grow", "a depth plan and then a widening of its result, in one streamed pass",
             LAYER_SPEC_HELP + "\n\n" + MODES_HELP)
    add_model_out(p)
    add_plan_options(p)
    add_width_options(p)
    add_output_options(p, "output dtype (default: the recipe's, else the source's)")
    p.set_defaults(run=cmd_surgery)
