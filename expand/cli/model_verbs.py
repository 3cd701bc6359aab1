"""Verbs about one model: `show` (what it is, or what a plan would make of it), `generate`, `convert`."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

from rich.table import Table
from rich.text import Text

from expand import io
from expand.cli.options import (
    LAYER_SPEC_HELP,
    add_mesh_options,
    claim_output,
    depth_plan,
    load_on_mesh,
    non_negative_float,
    parse_dtype,
    positive_int,
    probability,
    verb,
)
from expand.params import param_count
from expand.report import console, print_table

MODEL_HELP = "an HF directory, a .gguf file, an orbax directory written by expand, or 'smollm2' (embedded)"


def cmd_show(args) -> int:
    from expand.show import describe

    if (args.mesh or args.batch or args.seq_len or args.dtype) and not args.memory:
        raise ValueError("--mesh, --batch, --seq-len and --dtype of expand show go with --memory check|heal")
    plan = depth_plan(io.read_config(args.model), args, required=False)
    info = describe(args.model, plan)
    estimate = memory_estimate(args, plan) if args.memory else None
    if args.json:
        print(json.dumps(info | ({"memory": estimate.to_json()} if estimate else {}), indent=2))
        return 0
    table = Table(title=Text(str(args.model)), show_header=False)
    for key, value in info["table"]:
        table.add_row(Text(key), Text(value))
    console.print(table)
    if estimate:
        print_estimate(estimate)
    return 0


def memory_estimate(args, plan):
    """XLA's memory analysis of what `expand check` (the plan as the candidate) or `expand heal` (the model
    through the plan, distilled from itself) compiles for --mesh, on abstract shapes."""
    from expand.memory import check_estimate, compile_devices, heal_estimate
    from expand.sharding import make_mesh, mesh_devices, parse_mesh

    config = io.read_config(args.model)
    sizes = parse_mesh(args.mesh or "fsdp=1")
    mesh = make_mesh(sizes, compile_devices(mesh_devices(sizes)))
    if args.memory == "check":
        tokens = (args.batch or 4, args.seq_len or 512)
        return check_estimate(config, mesh, args.mesh or "one device", tokens, args.dtype or "fp32", plan)
    if args.dtype not in (None, "fp32"):
        raise ValueError("expand heal trains in fp32: --dtype goes with --memory check")
    return heal_estimate(config, mesh, args.mesh or "one device", (args.batch or 4, args.seq_len or 256), plan)


def print_estimate(estimate) -> None:
    from expand.show import human_bytes as gib

    rows = [{"compiled": c.name, "arguments": gib(c.arguments), "outputs": gib(c.outputs),
             "temporaries": gib(c.temporaries), "total": gib(c.total)} for c in estimate.compiled]
    b, t = estimate.tokens
    print_table(rows, f"expand {estimate.verb}: XLA's memory analysis per device, mesh {estimate.mesh} compiled "
                f"for {estimate.devices}, {b} x {t} tokens, {estimate.dtype}", left=("compiled",))
    for stage, value in estimate.stages.items():
        console.print(Text(f"  {stage}: {gib(value)} per device"))
    console.print(Text("hand arithmetic per device: " + ", ".join(f"{k} {gib(v)}" for k, v in estimate.hand.items())))
    console.print(Text(f"peak: {gib(estimate.peak)} per device", style="bold"))


@contextlib.contextmanager
def compile_devices(args):
    """show --memory with a mesh of more devices than the machine has compiles for that many simulated CPU
    devices, which XLA must be asked for before anything starts a backend."""
    if args.memory and args.mesh and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        from expand.sharding import mesh_devices, parse_mesh

        count = mesh_devices(parse_mesh(args.mesh))
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={count}"
    yield


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
    p.add_argument("--llama-pro", type=positive_int, metavar="NEW_LAYERS", help="show the LLaMA-Pro expansion to NEW_LAYERS")
    p.add_argument("--identity", metavar="duplicates|SLOTS", help="with a plan: these slots as identity blocks")


def register(verbs) -> None:
    p = verb(verbs, "show", "architecture, parameter count and size of a model, or of what a plan would build "
             "(config.json is enough)", LAYER_SPEC_HELP)
    p.add_argument("model", help=MODEL_HELP)
    add_show_plan_options(p)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--memory", choices=("check", "heal"), help="compile what `expand check` (the plan as the "
                   "candidate, virtual) or `expand heal --teacher MODEL` runs, on abstract shapes for --mesh, and "
                   "print XLA's memory analysis per device (no weights read)")
    p.add_argument("--mesh", metavar="AXES", help="with --memory: the mesh, e.g. fsdp=8 or data=2,fsdp=4 (default: "
                   "one device; simulated CPU devices when the machine has fewer)")
    p.add_argument("--batch", type=positive_int, metavar="B", help="with --memory: sequences per batch (default: 4)")
    p.add_argument("--seq-len", type=positive_int, metavar="T", help="with --memory: tokens per sequence (default: 512 for "
                   "check, 256 for heal, as those verbs)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp64"), help="with --memory check: the check's dtype "
                   "(default: fp32)")
    p.set_defaults(run=cmd_show, devices=compile_devices)

    p = verb(verbs, "generate", "answer a prompt (chat template applied), streaming tokens", LAYER_SPEC_HELP)
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--prompt", required=True, help="the user message")
    p.add_argument("--max-new-tokens", type=positive_int, default=128, metavar="N", help="stop after N new tokens (or at EOS)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 is greedy; above 0 samples")
    p.add_argument("--top-p", type=probability, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
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
