"""`expand demo`: the main job, on the embedded SmolLM2-135M-Instruct.

Builds five variants, checks each against the base on the same real text, asks each the same chat
question, and writes a report directory:

1. identity duplicates (LLaMA-Pro, 30 -> 36 layers: a zeroed copy after every 5 layers)  expected: preserved
2. a plain self-merge (overlapping 10-layer slices, stride 5: 30 -> 50 layers)            expected: drifted
3. a pruned model (layers 20-24 removed, ShortGPT-style: 30 -> 25 layers)                  expected: drifted
4. an exact widening to the SmolLM2-360M shape (576 -> 960 wide, 9 -> 15 heads)            expected: preserved
5. the frankenllama widening to the same shape (block-diagonal, as published)              expected: drifted

Depth variants run virtually (the base's weights with a slot list); widenings are materialized.
Every number printed is computed in the run.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_PROMPT = "In one sentence, what does a transformer layer do?"
WIDTH_360M = dict(hidden_size=960, num_attention_heads=15, num_key_value_heads=5, intermediate_size=2560)


def variants(base):
    """(name, candidate) pairs; candidates are LayerPlans (virtual) or widened Models."""
    from expand.surgery.plan import llama_pro_plan, plan_from_layer_spec
    from expand.surgery.grow import widen_model

    n = base.config.num_hidden_layers
    yield "identity duplicates (LLaMA-Pro 30->36)", lambda: llama_pro_plan(n, n + n // 5)
    yield "self-merge 0:10,5:15,10:20,15:25,20:30", lambda: plan_from_layer_spec("0:10,5:15,10:20,15:25,20:30", n)
    yield "pruned: layers 20-24 removed", lambda: plan_from_layer_spec("0:20,25:", n)
    yield "exact widening to 960 (360M shape)", lambda: widen_model(base, **WIDTH_360M, mode="exact")
    yield "frankenllama widening to 960", lambda: widen_model(base, **WIDTH_360M, mode="frankenllama")


def answer(base, candidate, tokenizer, max_new_tokens: int = 40) -> str:
    """The candidate's greedy answer to CHAT_PROMPT."""
    from expand.container import Model
    from expand.generate import generate
    from expand.surgery.plan import LayerPlan
    from expand.text import chat_prompt

    prompt = chat_prompt(tokenizer, CHAT_PROMPT)
    if isinstance(candidate, LayerPlan):
        out = generate(base.params, base.config, [prompt], max_new_tokens, layer_ids=candidate.layer_ids,
                       slot_scales=candidate.slot_scales())
    else:
        model = candidate if isinstance(candidate, Model) else base
        out = generate(model.params, model.config, [prompt], max_new_tokens)
    return tokenizer.decode(out[0], skip_special_tokens=True).strip()


def run_demo(out: str | Path, overwrite: bool = False, seq_len: int = 512, num_sequences: int = 4) -> int:
    from rich.text import Text

    from expand.check import check, run_base
    from expand.io import input_path, load, load_tokenizer
    from expand.io.atomic import atomic_dir, refuse_existing, refuse_overlap
    from expand.progress import progress_bar
    from expand.report import console, plot_layers, plot_summary, print_reports, summary_row
    from expand.text import DEFAULT_TEXT, shipped_text, text_sha256, token_batch

    inputs = [input_path("smollm2")]
    refuse_overlap(out, inputs)
    refuse_existing(out, overwrite)
    console.print("[bold]expand demo[/]: SmolLM2-135M-Instruct, grown, pruned and widened, each checked against "
                  "the base on expand's own documentation")
    base = load("smollm2")
    tokenizer = load_tokenizer(base)
    text = shipped_text(DEFAULT_TEXT)
    tokens, texts = token_batch(base, text, seq_len, num_sequences), {DEFAULT_TEXT: text_sha256(text)}
    reports, answers = [], {"base": answer(base, None, tokenizer)}
    steps = list(variants(base))
    with progress_bar("checking variants", total=len(steps) + 1) as advance:
        base_run = run_base(base, tokens, "fp32")
        advance()
        for name, build in steps:
            candidate = build()
            reports.append(check(base, candidate, tokens=tokens, base_run=base_run, name=name))
            answers[name] = answer(base, candidate, tokenizer)
            advance()
    print_reports(reports, f"SmolLM2-135M variants vs the base (fp32, {num_sequences} x {seq_len} tokens of text; "
                           f"floor = fp32 vs fp64 of the base)")
    console.print(Text("Q: ", style="bold") + Text(CHAT_PROMPT))
    for name, text in answers.items():
        console.print(Text(f"  {name}", style="cyan") + Text(f": {text}"))
    with atomic_dir(out, overwrite, inputs=inputs) as tmp:
        summary = {"prompt": CHAT_PROMPT, "texts": texts, "tokens": list(tokens.shape), "floor": base_run.floor,
                   "table": [summary_row(r) for r in reports], "answers": answers,
                   "reports": [r.to_json() for r in reports]}
        (tmp / "report.json").write_text(json.dumps(summary, indent=2) + "\n")
        (tmp / "answers.txt").write_text(f"Q: {CHAT_PROMPT}\n\n" + "\n\n".join(f"[{k}]\n{v}" for k, v in answers.items()) + "\n")
        plot_layers([r for r in reports if r.layers], tmp / "drift_per_layer.png")
        plot_summary(reports, tmp / "summary.png")
    console.print(Text(f"report written to {out}/ (report.json, answers.txt, drift_per_layer.png, summary.png)"))
    expected = [True, False, False, True, False]
    return 0 if [r.preserved for r in reports] == expected else 1
