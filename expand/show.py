"""What `expand show` prints: a model's architecture, dtype, exact parameter count and size on disk, and,
given a layer spec or recipe, the model that plan would build, all from the config alone."""

from __future__ import annotations



from expand.config import Config
from expand.io import checkpoint_storage, read_config, resolve, stored_weight_dtype
from expand.params import param_count
from expand.report import format_config_float
from expand.surgery.plan import LayerPlan


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
        ("rms_norm_eps", format_config_float(config.rms_norm_eps)),
    ]


def describe(model, plan: LayerPlan | None = None) -> dict:
    """All `expand show` reports, as a dict (the JSON of --json; `table` holds the printed rows): the
    model's architecture and size, and with a plan the model it would build, its size on disk included."""
    path = resolve(model)
    config = read_config(model)
    count = param_count(config)
    stored, size = checkpoint_storage(path)
    rows = architecture_rows(config) + [
        ("dtype (stored)", stored),
        ("parameters", f"{count:,} ({human_count(count)})"),
        ("size on disk", f"{human_bytes(size)} ({size:,} bytes)" if size else "no weights (config only)"),
    ]
    info = {"model": str(model), "config": config.to_hf(), "parameters": count, "size_on_disk_bytes": size}
    if plan is not None:
        new_count = param_count(config, plan.layer_ids)
        dtype = plan.output_dtype(stored_weight_dtype(path))
        new_bytes = new_count * dtype.itemsize
        identity = plan.identity_slots
        rows += [
            ("plan", plan.description),
            ("new layers", str(plan.num_layers)),
            ("new parameters", f"{new_count:,} ({human_count(new_count)})"),
            ("new size on disk", f"{human_bytes(new_bytes)} ({new_bytes:,} bytes of weights in {dtype.name})"),
            ("layer map", plan.layer_map()),
        ]
        if identity:
            rows.append(("identity slots", ", ".join(map(str, identity))))
        info.update(num_layers=plan.num_layers, new_parameters=new_count, new_size_on_disk_bytes=new_bytes,
                    new_dtype=dtype.name, layer_map=plan.layer_map(), slots=plan.layer_ids.tolist(),
                    identity_slots=identity, plan=plan.to_json())
    info["table"] = rows
    return info
