"""Verbs about one model: `show` (what it is, or what a plan would make of it), `generate`, `convert`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from expand import io
from expand.cli.options import (LAYER_SPEC_HELP, add_mesh_options, claim_output, depth_plan, load_on_mesh,
                                parse_dtype, verb)
from expand.params import param_count
from expand.report import console

MODEL_HELP = "an HF directory, a .gguf file, an orbax directory written by expand, or 'smollm2' (embedded)"


def cmd_show(args) -> int:
    from expand.show import describe

    plan = depth_plan(io.read_config(args.model), args, required=False)
    info = describe(args.model, plan)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    table = Table(title=Text(str(args.model)), show_header=False)
    for key, value in info["table"]:
        table.add_row(Text(key), Text(value))
    console.print(table)
    return 0


def cmd_generate(args) -> int:
    from expand.generate import generate
    from expand.surgery.plan import plan_from_layer_spec
    from expand.text import chat_prompt

    model = load_on_mesh(args.model, args, dtype=parse_dtype(args.dtype))
    tokenizer = io.load_tokenizer(model)
    prompt = chat_prompt(tokenizer, args.prompt, args.raw)
    plan = None if args.layer_spec is None else plan_from_layer_spec(args.layer_spec, model.config.num_hidden_layers)
    produced: list[int] = []
    shown = ""

    def stream(row: int, token: int) -> None:
        nonlocal shown
        produced.append(token)
        text = tokenizer.decode(produced, skip_special_tokens=True)
        sys.stdout.write(text[len(shown):])
        sys.stdout.flush()
        shown = text

    generate(model.params, model.config, [prompt], args.max_new_tokens,
             layer_ids=None if plan is None else plan.layer_ids, temperature=args.temperature, top_p=args.top_p,
             seed=args.seed, on_token=stream)
    sys.stdout.write("\n")
    return 0


def cmd_convert(args) -> int:
    if (args.format == "gguf") != args.out.endswith(".gguf"):
        raise ValueError(f"OUT {args.out}: a GGUF file is written with --format gguf to a name ending in .gguf; "
                         "other formats write a directory")
    if args.format != "gguf" and args.dtype == "q8_0":
        raise ValueError("--dtype q8_0 is a GGUF quantization: add --format gguf")
    inputs = claim_output(args.out, args, args.src)
    if args.format == "gguf":
        return convert_to_gguf(args, inputs)
    model = io.load(args.src, dtype=parse_dtype(args.dtype))
    io.save(args.out, model.config, model.params, tokenizer_from=model, format=args.format,
            overwrite=args.force, provenance=model.lineage(), inputs=inputs)
    console.print(Text(f"wrote {args.out} ({args.format}, {args.dtype}, {param_count(model.config):,} parameters)"))
    return 0


def convert_to_gguf(args, inputs) -> int:
    from expand.io.gguf_writer import GGUF_DTYPES, write_gguf

    if args.dtype not in GGUF_DTYPES:
        raise ValueError(f"--format gguf writes --dtype {', '.join(GGUF_DTYPES)}, not {args.dtype!r}")
    model = io.load(args.src)
    write_gguf(args.out, model.config, model.params, model, dtype=args.dtype,
               name=Path(str(model.source)).name, overwrite=args.force, inputs=inputs)
    console.print(Text(f"wrote {args.out} (gguf, {args.dtype}, {param_count(model.config):,} parameters)"))
    return 0


def add_show_plan_options(p) -> None:
    p.add_argument("--layer-spec", metavar="SPEC", help="show the model this layer spec would build")
    p.add_argument("--recipe", metavar="YAML", help="show the model this mergekit passthrough recipe would build")
    p.add_argument("--llama-pro", type=int, metavar="NEW_LAYERS", help="show the LLaMA-Pro expansion to NEW_LAYERS")
    p.add_argument("--identity", metavar="duplicates|SLOTS", help="with a plan: these slots as identity blocks")


def register(verbs) -> None:
    p = verb(verbs, "show", "architecture, parameter count and size of a model, or of what a plan would build "
             "(config.json is enough)", LAYER_SPEC_HELP)
    p.add_argument("model", help=MODEL_HELP)
    add_show_plan_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(run=cmd_show)

    p = verb(verbs, "generate", "answer a prompt (chat template applied), streaming tokens", LAYER_SPEC_HELP)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="stop after N new tokens (or at EOS)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy; above 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--layer-spec", metavar="SPEC", help="run a depth plan virtually (shared weights), e.g. -8: or "
                   "0:10,10:20:2,20:")
    p.add_argument("--raw", action="store_true", help="send the prompt as it is, without the chat template")
    p.add_argument("--dtype", default="fp32", help="the dtype the weights are loaded and run in")
    add_mesh_options(p)
    p.set_defaults(run=cmd_generate)

    p = verb(verbs, "convert", "GGUF / HF / orbax -> an HF or orbax directory, or a GGUF file for llama.cpp")
    p.add_argument("src", help=MODEL_HELP)
    p.add_argument("out", help="the directory (or with --format gguf, the .gguf file) to write (must not exist, "
                   "unless --force)")
    p.add_argument("--format", choices=("hf", "orbax", "gguf"), default="hf", help="hf: safetensors + config.json; "
                   "orbax: an orbax checkpoint that expand loads; gguf: one llama.cpp file with the tokenizer and "
                   "chat template")
    p.add_argument("--dtype", default="fp32", help="the dtype the weights are written in (gguf: fp32, fp16, bf16 "
                   "or q8_0; norms stay fp32)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists (never an input)")
    p.set_defaults(run=cmd_convert)
