"""The model card (README.md) every output directory carries: what the model was made from, each operation
of its history (a depth plan as a runnable mergekit passthrough recipe, a widening or a healing as its
settings), the architecture and exact parameter count, whether a function check was recorded, the chat
template, and the expand version that wrote it. Everything in it is read from the config and the
provenance (expand.json), which stays the machine-readable record."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import yaml

from expand.config import Config
from expand.params import param_count
from expand.provenance import FILE_NAME, Provenance


def expand_version() -> str:
    try:
        return metadata.version("expand")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown (not installed)"


def _slices(slots: list[dict]) -> list[tuple[str | None, int, int, dict]]:
    """(model, start, stop, scales) runs of consecutive layers of one model with the same scales."""
    runs: list[list] = []
    for slot in slots:
        last = runs[-1] if runs else None
        if last and last[0] == slot["model"] and last[2] == slot["layer"] and last[3] == slot["scales"]:
            last[2] += 1
        else:
            runs.append([slot["model"], slot["layer"], slot["layer"] + 1, slot["scales"]])
    return [tuple(run) for run in runs]


def _scale_setting(scales: dict, names: dict[str, str]) -> list[dict]:
    return [{"filter": names.get(name, name.removeprefix("layers.")), "value": float(value)}
            for name, value in scales.items()]


OUTER_HF_NAMES = {"embed_tokens.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                  "lm_head.weight": "lm_head.weight"}


def recipe_of(operation: dict, model: str) -> dict:
    """A depth operation (LayerPlan.to_json) as a mergekit passthrough recipe that `expand depth --recipe`
    and mergekit-yaml both run: one slice per run of consecutive layers with the same scales, each scale
    as a `{filter, value}` on the tensor's name (`self_attn.o_proj.weight`); single-model plans read `model`."""
    slices = []
    for source_model, start, stop, scales in _slices(operation["slots"]):
        entry = {"sources": [{"model": source_model or model, "layer_range": [start, stop]}]}
        if scales:
            entry["parameters"] = {"scale": _scale_setting(scales, {})}
        slices.append(entry)
    recipe = {"slices": slices, "merge_method": "passthrough"}
    if operation.get("outer_scales"):
        recipe["parameters"] = {"scale": _scale_setting(operation["outer_scales"], OUTER_HF_NAMES)}
    for key in ("dtype", "out_dtype"):
        if operation.get(key):
            recipe[key] = operation[key]
    return recipe


def _operation_section(step: int, operation: dict, model: str) -> list[str]:
    kind = operation.get("op", "?")
    if kind == "depth":
        recipe = yaml.safe_dump(recipe_of(operation, model), sort_keys=False, default_flow_style=None)
        source = f"`{model}`" if step == 1 else f"the output of step {step - 1} (`{model}` below)"
        return [f"### {step}. depth: {operation.get('description') or operation.get('layer_spec')}", "",
                f"{len(operation['slots'])} layers from the {operation['num_source_layers']} of {source} (layer "
                f"spec `{operation['layer_spec']}`). As a mergekit passthrough recipe (`expand depth {model} OUT "
                "--recipe recipe.yaml`, or `mergekit-yaml recipe.yaml OUT`):", "", "```yaml", recipe.rstrip(),
                "```", ""]
    settings = {k: v for k, v in operation.items() if k not in ("op", "maps")}
    return [f"### {step}. {kind}", "", "```yaml", yaml.safe_dump(settings, sort_keys=False).rstrip(), "```", ""]


CHECK_HEADING = ["## Check", ""]
CHECK_FILE = "check.json"


def check_section(report: dict, base: str, text: dict[str, str]) -> list[str]:
    """The card's check section for a recorded `expand.check` report (its `to_json()`), measured on the
    shipped text `text` ({name: sha256})."""
    (name, sha), = text.items()
    batch, length = report["tokens"]
    drift = report["first_drift_layer"]
    return CHECK_HEADING + [
        f"Checked against `{base}` before this directory was written (`{CHECK_FILE}` holds the whole report, per-layer "
        f"drift included), on {batch} x {length} tokens of expand's shipped text `{name}` (sha256 {sha[:12]}...):", "",
        "| verdict | max abs delta logit | numerical floor | mean KL | top-1 agreement | first drifting slot |",
        "|---|---|---|---|---|---|",
        f"| {report['verdict']} | {report['max_abs_logit_delta']:.3g} | {report['floor']:.3g} | {report['mean_kl']:.3g} | "
        f"{report['top1_agreement']:.1%} | {'none' if drift is None else drift} |", ""]


def record_check(directory: Path, report: dict, base: str, text: dict[str, str]) -> None:
    """Write `report` as check.json into an output directory and put its verdict into the card (README.md),
    in place of the section that says no check was recorded."""
    (directory / CHECK_FILE).write_text(json.dumps({"texts": text, **report}, indent=2) + "\n")
    card = (directory / "README.md").read_text().split("\n")
    start = card.index(CHECK_HEADING[0])
    end = next(i for i in range(start + 1, len(card)) if card[i].startswith("## "))
    (directory / "README.md").write_text("\n".join(card[:start] + check_section(report, base, text) + card[end:]))


def model_card(name: str, config: Config, dtype: str, provenance: Provenance | None,
               chat_template: bool) -> str:
    """The README.md of output directory `name`."""
    base = provenance.base if provenance is not None else None
    history = list(provenance.history) if provenance is not None else []
    source = f"`{base}`" if base else "a checkpoint with no recorded source"
    made = f", by {len(history)} operation{'s' * (len(history) != 1)} (below)" if history else ""
    lines = [f"# {name}", "", f"Written by expand {expand_version()} from {source}{made}.", ""]
    lines += ["| | |", "|---|---|",
              f"| layers | {config.num_hidden_layers} |", f"| hidden size | {config.hidden_size} |",
              f"| attention heads / kv heads | {config.num_attention_heads} / {config.num_key_value_heads} |",
              f"| head_dim | {config.head_dim} |", f"| intermediate size | {config.intermediate_size} |",
              f"| vocabulary | {config.vocab_size} |", f"| parameters | {param_count(config):,} |",
              f"| dtype | {dtype} |", ""]
    if history:
        lines += ["## How it was made", ""]
        for step, operation in enumerate(history, 1):
            lines += _operation_section(step, operation, (base or "MODEL") if step == 1 else "MODEL")
    lines += CHECK_HEADING + ["No function check was recorded with this model. Compare it with its base layer by "
                              f"layer (the layer map is in {FILE_NAME}):", "", "```",
                              f"expand check {base or 'BASE'} {name}", "```", ""]
    tokenizer = "the tokenizer" + (" and its chat template (carried over from the source)" if chat_template else "")
    record = f", and `{FILE_NAME}` (the provenance: slot -> base layer, base width, every operation)" \
        if provenance is not None else ""
    lines += ["## Files", "", f"`config.json`, `generation_config.json`, the weights, {tokenizer}{record}.", ""]
    lines += ["```python", "import expand", f'model = expand.load("{name}")', "```", ""]
    return "\n".join(lines)
