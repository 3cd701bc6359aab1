"""What `expand show` prints: a model's architecture, dtype, exact parameter count and size on disk, and,
given a layer spec or recipe, the model that plan would build, all from the config alone."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from expand.config import Config
from expand.io import read_config, resolve
from expand.io.gguf import GGUFSource
from expand.params import param_count
from expand.surgery.plan import LayerPlan, plan_from_layer_spec
from expand.surgery.recipe import plan_from_recipe


def human_count(n: int) -> str:
    """134515008 -> '134.5M', 13264949248 -> '13.3B'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def human_bytes(n: int) -> str:
    for div, suffix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= div:
            return f"{n / div:.1f} {suffix}"
    return f"{n} B"


def stored_dtype(path: Path) -> str:
    """The weights' dtype as stored: GGUF tensor types with counts, else config.json's dtype field."""
    if path.suffix == ".gguf":
        counts = Counter(t.tensor_type.name for t in GGUFSource(path).reader.tensors)
        return ", ".join(f"{name} x{n}" for name, n in counts.most_common()) + " (dequantized on load)"
    import json

    d = json.loads((path / "config.json").read_text())
    return str(d.get("dtype") or d.get("torch_dtype") or "unknown")


def weight_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    files = [*path.glob("*.safetensors"), *path.glob("params/**/*")]
    return sum(f.stat().st_size for f in files if f.is_file())


def architecture_rows(config: Config) -> list[tuple[str, str]]:
    rope = "default" if config.rope_scaling is None else (
        f"{config.rope_scaling.rope_type} x{config.rope_scaling.factor:g}")
    biases = [n for n, on in (("attention", config.attention_bias), ("mlp", config.mlp_bias)) if on]
    group = config.num_attention_heads // config.num_key_value_heads
    return [
        ("architecture", {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM"}[config.model_type]),
        ("layers", str(config.num_hidden_layers)),
        ("hidden size", str(config.hidden_size)),
        ("attention heads", f"{config.num_attention_heads} query, {config.num_key_value_heads} kv "
                            f"(group {group}), head_dim {config.head_dim}"),
        ("intermediate size", str(config.intermediate_size)),
        ("vocab", str(config.vocab_size)),
        ("embeddings", "tied" if config.tie_word_embeddings else "untied"),
        ("biases", ", ".join(biases) or "none"),
        ("rope", f"theta {config.rope_theta:g}, {rope}"),
        ("rms_norm_eps", f"{config.rms_norm_eps:g}"),
    ]


def plan_for(config: Config, layer_spec: str | None, recipe: str | None) -> LayerPlan | None:
    if layer_spec and recipe:
        raise ValueError("give --layer-spec or --recipe, not both")
    if layer_spec:
        return plan_from_layer_spec(layer_spec, config.num_hidden_layers)
    if recipe:
        return plan_from_recipe(recipe, num_layers=config.num_hidden_layers)
    return None


def describe(model, layer_spec: str | None = None, recipe: str | None = None) -> dict:
    """All `expand show` reports, as a dict (the JSON of --json; `table` holds the printed rows)."""
    path = resolve(model)
    config = read_config(model)
    count = param_count(config)
    size = weight_bytes(path)
    rows = architecture_rows(config) + [
        ("dtype (stored)", stored_dtype(path)),
        ("parameters", f"{count:,} ({human_count(count)})"),
        ("size on disk", f"{human_bytes(size)} ({size:,} bytes)" if size else "no weights (config only)"),
    ]
    info = {"model": str(model), "config": config.to_hf(), "parameters": count, "size_on_disk_bytes": size}
    plan = plan_for(config, layer_spec, recipe)
    if plan is not None:
        new_count = param_count(config, plan.layer_ids)
        identity = plan.identity_slots
        rows += [
            ("plan", plan.description),
            ("new layers", str(plan.num_layers)),
            ("new parameters", f"{new_count:,} ({human_count(new_count)})"),
            ("layer map", plan.layer_map()),
        ]
        if identity:
            rows.append(("identity slots", ", ".join(map(str, identity))))
        info.update(num_layers=plan.num_layers, new_parameters=new_count, layer_map=plan.layer_map(),
                    slots=plan.layer_ids.tolist(), identity_slots=identity, plan=plan.to_json())
    info["table"] = rows
    return info
