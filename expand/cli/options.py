"""What the verbs share: option groups with their help, the help formatter, and turning options into the
library's inputs (dtypes, depth plans, token batches, models placed on a mesh)."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
from pathlib import Path

import jax.numpy as jnp

from expand import io
from expand.io import atomic

DTYPES = {"fp32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16,
          "fp16": jnp.float16, "float16": jnp.float16, "fp64": jnp.float64, "float64": jnp.float64}

LAYER_SPEC_HELP = """\
layer specs (--layer-spec): comma-separated items, each a layer `i`, a range `start:stop` or
`start:stop:step`, with Python's slice rules:
  stop is exclusive          0:8 is layers 0..7; 0-24 is not a range (write 0:25)
  open ends                  :8 is 0:8, 20: is 20 to the last layer
  negative numbers           count from the end: -8: is the last 8 layers, -1 the last layer
  a negative step            reverses: 7:3:-1 is 7, 6, 5, 4
  all                        every layer once
Items are concatenated: on 30 layers 0:20,10:30 is 40 slots (layers 10-19 run twice).
A spec starting with `-` works as written: --layer-spec -8: (no `=` needed)."""

SWEEP_HELP = """\
sweeps (--sweep), on a model of N layers:
  delete-one          N variants: layer i removed
  duplicate-one       N variants: layer i run twice in a row
  delete-block:n      N-n+1 variants: layers i..i+n-1 removed
  window:W:S          self-merges of windows of width W at stride S ([0,W), [S,S+W), ..., the last ending
                      at N); W and S may be comma lists: window:10,15:5 is widths 10 and 15 at stride 5
  swap-adjacent       N-1 variants: layers i and i+1 swapped
  prune-greedy[:T]    remove the layer whose removal raises KL to the base least, repeat down to T layers
                      (default N//2)
  prune-bi[:T]        remove layers in increasing Block Influence order down to T layers (default N//2)
  specs:FILE          one layer spec per line (# comments)"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the epilog's layout and appends '(default: X)' to every option that has a real default."""

    def _get_help_string(self, action):
        text = action.help or ""
        has_default = action.default is not None and action.default is not False and action.default != argparse.SUPPRESS
        if has_default and "%(default)" not in text and action.option_strings:
            text += " (default: %(default)s)"
        return text


def verb(verbs, name: str, help: str, epilog: str | None = None) -> argparse.ArgumentParser:
    return verbs.add_parser(name, help=help, description=help, epilog=epilog, formatter_class=HelpFormatter)


# ---- option groups ------------------------------------------------------------------------------------


def add_plan_options(p: argparse.ArgumentParser) -> None:
    """Options that describe a depth plan (`depth_plan` reads them)."""
    p.add_argument("--layer-spec", metavar="SPEC", help="the stored layer each slot of the new model runs, e.g. "
                   "0:20,10:30 or -8: (syntax below)")
    p.add_argument("--recipe", metavar="YAML", help="a mergekit passthrough recipe; its models are read from the "
                   "recipe (MODEL names the one whose config and tokenizer lead; a single-model recipe applies to "
                   "MODEL)")
    p.add_argument("--llama-pro", type=positive_int, metavar="NEW_LAYERS",
                   help="LLaMA-Pro block expansion to NEW_LAYERS layers: an identity copy after every group")
    p.add_argument("--identity", metavar="duplicates|SLOTS",
                   help="make these slots identity blocks (o_proj and down_proj scaled to 0): 'duplicates' (every "
                        "slot whose layer already ran) or comma-separated slot numbers")


def add_mesh_options(p: argparse.ArgumentParser) -> None:
    """Options of every verb that runs the model: where its weights live (`run_devices` reads them)."""
    p.add_argument("--mesh", metavar="AXES", help="shard the weights over a device mesh of data (batch rows), "
                   "fsdp (residual width) and tp (heads, MLP, vocab), e.g. fsdp=8, fsdp=2,tp=4 or data=2,fsdp=4 "
                   "(default: one device)")
    p.add_argument("--coordinator", metavar="HOST:PORT", help="several processes: process 0's address "
                   "(jax.distributed; every process runs the same command with its own --process-id)")
    p.add_argument("--num-processes", type=positive_int, metavar="N", help="several processes: how many")
    p.add_argument("--process-id", type=int, metavar="I", help="several processes: this one's index, 0..N-1")
    p.add_argument("--init-timeout", type=positive_int, default=300, metavar="SECONDS",
                   help="several processes: how long each waits for the others to start before it stops with an "
                        "error naming the missing ones (default: %(default)s)")
    p.set_defaults(devices=run_devices)


@contextlib.contextmanager
def run_devices(args):
    """What a verb with mesh options runs on, set up before anything touches a device: with --coordinator
    (or --num-processes / --process-id), jax.distributed first, and only process 0 prints reports; with
    --mesh, the mesh made current (`jax.set_mesh`), which `load_on_mesh` places the weights on and the
    forward splits its batch over."""
    from expand import distributed
    from expand.sharding import make_mesh, parse_mesh

    if any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        if not args.mesh:
            raise ValueError("several processes run one mesh over all their devices: give --mesh too, e.g. "
                             "--mesh fsdp=4 for 2 processes of 2 devices each")
        distributed.initialize(args.coordinator, args.num_processes, args.process_id, args.init_timeout)
        if not distributed.is_writer():
            from expand import progress, report

            report.console.quiet = progress.console.quiet = True
    if not args.mesh:
        yield
        return
    import jax

    with jax.set_mesh(make_mesh(parse_mesh(args.mesh))):
        yield


def add_eval_options(p: argparse.ArgumentParser, seq_len: int = 512, num_sequences: int | None = 4) -> None:
    """Options of every verb that evaluates on a token batch."""
    p.add_argument("--text", nargs="+", metavar="FILE", help="text files, or a text shipped with expand: "
                   "expand-docs (the default, about 11k tokens) or python-reference (about 110k tokens)")
    p.add_argument("--random-tokens", action="store_true", help="use uniformly random tokens instead of text")
    p.add_argument("--seq-len", type=positive_int, default=seq_len, metavar="T", help="tokens per sequence")
    p.add_argument("--num-sequences", type=positive_int, default=num_sequences, metavar="B",
                   help="sequences (consecutive windows of the text)" +
                        (" (default: every full window)" if num_sequences is None else ""))


def add_output_options(p: argparse.ArgumentParser, dtype_help: str) -> None:
    """Options of every verb that writes a checkpoint directory."""
    p.add_argument("--dtype", choices=sorted(DTYPES), metavar="DTYPE", help=dtype_help)
    p.add_argument("--max-shard-size", default="2GB", metavar="SIZE", help="largest safetensors file, e.g. 5GB, "
                   "500MB")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input)")
    p.add_argument("--check", action="store_true", help="before OUT is published, check it against MODEL on 4 x 512 "
                   "tokens of expand's shipped text and record the verdict in OUT (check.json, and in README.md)")


# ---- from options to inputs ---------------------------------------------------------------------------


def input_paths(args, *models) -> list[Path]:
    """Everything a verb reads: `models`, and where the verb has them, --recipe and the recipe's models,
    --text files and a specs: sweep file."""
    reads = [io.input_path(m) for m in models if m]
    recipe = getattr(args, "recipe", None)
    if recipe:
        from expand.surgery.recipe import recipe_model_names

        reads += [Path(recipe), *(io.input_path(m) for m in recipe_model_names(recipe))]
    reads += [Path(text) for text in (getattr(args, "text", None) or []) + (getattr(args, "eval_text", None) or [])]
    sweep = getattr(args, "sweep", None) or ""
    if sweep.startswith("specs:"):
        reads.append(Path(sweep.removeprefix("specs:")))
    return reads


def claim_output(out, args, *models, overwrite: bool | None = None) -> list[Path]:
    """Refuse an OUT that is, lies inside or contains anything the verb reads (`input_paths`), with or
    without --force, then claim OUT for this run: another run writing it, or OUT existing without --force
    (or `overwrite`, where the verb decides), is refused (exit 2) before any work. With several processes process 0 claims it, and a refusal there is
    an error on every process. Returns the inputs, for the write's own check."""
    from expand.distributed import on_writer

    reads = input_paths(args, *models)
    on_writer(lambda: atomic.claim_output(out, args.force if overwrite is None else overwrite, reads))
    return reads


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a count or a size)."""
    return _bounded(text, int, lambda v: v >= 1, "a whole number of at least 1")


def non_negative_int(text: str) -> int:
    return _bounded(text, int, lambda v: v >= 0, "a whole number of at least 0")


def positive_float(text: str) -> float:
    return _bounded(text, float, lambda v: v > 0 and math.isfinite(v), "a finite number above 0")


def non_negative_float(text: str) -> float:
    return _bounded(text, float, lambda v: v >= 0 and math.isfinite(v), "a finite number of at least 0")


def probability(text: str) -> float:
    return _bounded(text, float, lambda v: 0 < v <= 1, "a number in (0, 1]")


def _bounded(text: str, kind, ok, what: str):
    try:
        value = kind(text)
    except ValueError:
        value = None
    if value is None or not ok(value):
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def parse_dtype(name: str):
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def depth_plan(config, args, required: bool = True):
    """The LayerPlan the options ask for (--layer-spec, --recipe or --llama-pro, then --identity), or None
    when none is given and `required` is False."""
    from expand.surgery.request import plan_from_options

    return plan_from_options(config, layer_spec=args.layer_spec, recipe=args.recipe, llama_pro=args.llama_pro,
                             identity=args.identity, required=required)


def load_on_mesh(path, args, dtype=jnp.float32):
    """io.load, with each tensor placed straight into its shards on the current mesh (`run_devices`: --mesh)."""
    from expand.sharding import current_mesh, placement

    mesh = current_mesh()
    if mesh is None:
        return io.load(path, dtype=dtype)
    return io.load(path, dtype=dtype, placement=placement(io.read_config(path), mesh))


def eval_tokens(model, args):
    """The (sequences, length) eval batch of a verb with --text / --random-tokens / --seq-len /
    --num-sequences."""
    from expand.text import random_batch

    if args.random_tokens:
        return random_batch(model.config.vocab_size, args.seq_len, args.num_sequences or 4)
    return text_windows(model, args.text, args.seq_len, args.num_sequences, "--text", "--num-sequences")


def text_windows(model, paths, seq_len: int, count: int | None, option: str, count_option: str):
    """`token_batch` of the texts an option names (None: the default text); a text too short for the
    windows is refused naming that option and the flags that cut it."""
    from expand.text import TextTooShort, read_texts, token_batch

    try:
        return token_batch(model, read_texts(paths) if paths else None, seq_len, count)
    except TextTooShort as e:
        named = f"{option} {' '.join(map(str, paths))}" if paths else f"the default text (no {option})"
        raise TextTooShort(f"{named}: {e} ({count_option} sets how many windows it is cut into, --seq-len their "
                           "length)") from e


# ---- argv --------------------------------------------------------------------------------------------

SPEC_OPTIONS = ("--layer-spec", "--identity")
_LOOKS_LIKE_SPEC = re.compile(r"^-[\d:]")


def join_negative_values(argv: list[str]) -> list[str]:
    """`--layer-spec -8:` -> `--layer-spec=-8:`: argparse takes a value starting with '-' for an option
    unless it is a plain negative number, so a spec like -8: or -4:-1 would be refused as written."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] in SPEC_OPTIONS and i + 1 < len(argv) and _LOOKS_LIKE_SPEC.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out
