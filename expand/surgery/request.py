"""A depth plan from the ways a user asks for one: a layer spec, a mergekit recipe or LLaMA-Pro expansion,
optionally with identity slots. Used by the command line and `expand show`."""

from __future__ import annotations

from expand.config import Config
from expand.surgery.plan import LayerPlan, llama_pro_plan, plan_from_layer_spec, with_identity
from expand.surgery.recipe import plan_from_recipe, recipe_model_names


def plan_from_options(config: Config, layer_spec: str | None = None, recipe: str | None = None,
                      llama_pro: int | None = None, identity: str | None = None,
                      required: bool = True) -> LayerPlan | None:
    """Exactly one of layer_spec / recipe / llama_pro (None where not given; an empty spec is an error, not
    a missing one), then identity: 'duplicates' or comma-separated slot numbers. Returns None when nothing
    is asked for and `required` is False."""
    chosen = [name for name, value in (("--layer-spec", layer_spec), ("--recipe", recipe),
                                       ("--llama-pro", llama_pro)) if value is not None]
    if len(chosen) > 1:
        raise ValueError(f"give one of --layer-spec, --recipe, --llama-pro (got {' and '.join(chosen)})")
    if not chosen:
        if identity is not None:
            raise ValueError("--identity marks slots of a plan: give --layer-spec, --recipe or --llama-pro too")
        if required:
            raise ValueError("give a depth plan: --layer-spec, --recipe or --llama-pro")
        return None
    if llama_pro is not None:
        plan = llama_pro_plan(config.num_hidden_layers, llama_pro)
    elif recipe is not None:  # a single-model recipe applies to this model, whatever its `model:` says
        single = len(recipe_model_names(recipe)) == 1
        plan = plan_from_recipe(recipe, num_layers=config.num_hidden_layers if single else None)
    else:
        plan = plan_from_layer_spec(layer_spec, config.num_hidden_layers)
    if identity == "duplicates":
        return with_identity(plan, duplicates=True)
    if identity is not None:
        try:
            slots = [int(x) for x in identity.split(",")]
        except ValueError:
            raise ValueError(f"--identity takes 'duplicates' or comma-separated slot numbers, got {identity!r}") from None
        return with_identity(plan, slots=slots)
    return plan
