"""Depth costs no compilation: the check forward, a heal step and generation compile the same programs, of
the same size, for a 4-slot and a 40-slot model, and a 40-slot virtual plan over the 4-layer model reuses
nothing it should not. The slot loop is a `lax.scan` over `layer_ids`, never unrolled, so XLA compiles one
slot body whatever the depth (experiments/bench_compile.py times it)."""

from __future__ import annotations

import contextlib
from collections import Counter

import jax
import numpy as np
import pytest

import expand
from expand.config import Config
from expand.container import Model
from expand.model import forward
from expand.params import init_params

pytestmark = pytest.mark.slow

TINY = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=128, hidden_size=32,
            intermediate_size=64, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
            rope_theta=10000.0, max_position_embeddings=128, tie_word_embeddings=False, bos_token_id=1,
            eos_token_id=2)
DEPTHS = (4, 40)


def tiny_model(num_layers: int) -> Model:
    config = Config.from_hf({**TINY, "num_hidden_layers": num_layers})
    return Model(config, init_params(config, jax.random.key(num_layers)))


@contextlib.contextmanager
def compilations():
    """Collect the name of every function XLA compiles inside the block, as a Counter."""
    names: Counter = Counter()

    def listen(event: str, duration: float, **info) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            names[info.get("fun_name")] += 1

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        yield names
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)


def hlo_size(lowered) -> int:
    return sum(1 for line in lowered.compile().as_text().splitlines() if " = " in line)


def compiled_by(run) -> Counter:
    jax.clear_caches()
    with compilations() as names:
        run()
    return names


def check_forward(model: Model, layer_ids=None):
    tokens = np.arange(24, dtype=np.int32).reshape(2, 12) % model.config.vocab_size
    return forward(model.params, tokens, model.config, layer_ids=layer_ids, return_hidden=True)


def test_check_forward_compiles_once_and_the_same_program_at_any_depth():
    shallow, deep = (tiny_model(n) for n in DEPTHS)
    assert compiled_by(lambda: check_forward(shallow)) == compiled_by(lambda: check_forward(deep)) == Counter({"jit(forward)": 1})
    tokens = np.zeros((2, 12), np.int32)
    sizes = [hlo_size(forward.lower(m.params, tokens, m.config, return_hidden=True)) for m in (shallow, deep)]
    assert sizes[0] == sizes[1]
    virtual = np.arange(DEPTHS[1]) % DEPTHS[0]
    assert compiled_by(lambda: check_forward(shallow, virtual)) == Counter({"jit(forward)": 1})
    with compilations() as names:  # another plan of the same length reuses the compiled forward
        check_forward(shallow, virtual[::-1].copy())
    assert names == Counter()


def test_generation_compiles_the_same_programs_at_any_depth():
    def run(model: Model):
        return lambda: expand.generate(model.params, model.config, [[3, 4, 5]], 20, eos_token_ids=[])

    shallow, deep = (tiny_model(n) for n in DEPTHS)
    names = compiled_by(run(shallow))
    assert names == compiled_by(run(deep))
    assert names["jit(_prefill)"] == names["jit(_decode)"] == 1


def test_a_heal_step_compiles_the_same_programs_at_any_depth():
    """One step of `expand.heal` (LM + KL to the teacher, AdamW) on a 4- and a 40-layer student through a
    plan that runs every layer twice (8 and 80 slots, weights shared by two slots each)."""
    def run(model: Model):
        n = model.config.num_hidden_layers
        plan = expand.plan_from_layer_spec(f"0:{n},0:{n}", n)
        tokens = np.arange(48, dtype=np.int32).reshape(4, 12) % model.config.vocab_size
        return lambda: expand.heal(model, tokens, plan, teacher=model, options=expand.HealOptions(steps=1, batch_size=2))

    shallow, deep = (tiny_model(n) for n in DEPTHS)
    names = compiled_by(run(shallow))
    assert names == compiled_by(run(deep))
    assert sum(names.values()) >= 2  # the teacher's forward and the step, at least
