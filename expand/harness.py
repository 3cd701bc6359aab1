"""EleutherAI's lm-evaluation-harness on expand's forward pass: `ExpandLM` is an lm-eval `LM` (registered
as `expand`) that scores a model, or a depth plan run virtually on it (no checkpoint written), and
`evaluate` runs lm-eval's `simple_evaluate` for one model and any number of plans on one copy of the
weights. Needs the `[eval]` extra (lm-eval 0.4.13, no torch).

How requests become batches (the same arithmetic as lm-eval's Hugging Face backend, so the numbers agree):
a (context, continuation) pair of token lists is scored on the window
    whole = (context + continuation)[-(L + 1):],  inputs = whole[:-1],  targets = whole[1:]
(L = max_length, left truncation), and
    log p(continuation) = sum over its n tokens of log_softmax(logits)[t, targets[t]]
for the last n positions; `is_greedy` says every continuation token is the argmax. Requests whose
inputs are equal (a multiple-choice question with one-token answers) differ only in their last target,
so they share one row: the row returns the target log-probs of one representative and the full
log-softmax (V,) at its last position, from which each request's last token is read.

Rows are sorted by length and right-padded to a bucket length (powers of two from 16, capped at L), in
batches of a fixed number of rows, so the scorer compiles once per bucket, not once per request.
Right padding needs no attention mask: attention is causal, so a real token never sees the pads after it.
"""

from __future__ import annotations

from functools import partial
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    _add_special_kwargs,
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)

from expand.container import Model
from expand.model import TRACE_COUNTS, forward
from expand.numerics import log_probs, picked
from expand.params import param_count
from expand.progress import progress_bar

MIN_BUCKET = 16


@partial(jax.jit, static_argnames=("config",))
def score_rows(params, inputs, targets, last, config, layer_ids, slot_scales):
    """inputs, targets (B, T) int32, last (B,) int32 (the last real position of each row) ->
    target log-probs (B, T), whether each target is the argmax (B, T) bool, and the log-softmax at each
    row's last position (B, V), in at least float32 (`expand.numerics.log_probs`). Logits are f(inputs)
    under `layer_ids` / `slot_scales`."""
    TRACE_COUNTS["score_rows"] += 1
    logits = forward(params, inputs, config, layer_ids=layer_ids, slot_scales=slot_scales)
    logp = log_probs(logits)
    greedy = jnp.argmax(logp, axis=-1) == targets
    return picked(logp, targets), greedy, jnp.take_along_axis(logp, last[:, None, None], axis=1)[:, 0]


def bucket_length(length: int, max_length: int) -> int:
    """The padded length of a batch whose longest row has `length` tokens: the next power of two >= 16,
    at most max_length."""
    return min(max_length, max(MIN_BUCKET, 1 << (max(length, 1) - 1).bit_length()))


def score_window(context: Sequence[int], continuation: Sequence[int], max_length: int):
    """(inputs, targets, n) of one request: the last max_length + 1 tokens of context + continuation,
    shifted by one; the continuation is the last n = len(continuation) targets."""
    if not continuation:
        raise ValueError("an lm-eval request with an empty continuation has nothing to score")
    if len(continuation) > max_length:
        raise ValueError(f"a continuation of {len(continuation)} tokens exceeds max_length {max_length}")
    whole = (list(context) + list(continuation))[-(max_length + 1):]
    return tuple(whole[:-1]), tuple(whole[1:]), len(continuation)


@register_model("expand")
class ExpandLM(TemplateLM):
    """An lm-eval LM backed by expand. `model`: a `Model` (or a path / embedded name, loaded in float32);
    `plan`: a LayerPlan run virtually (None: the model as stored); `tokenizer`: default the model's.
    batch_size: rows per forward (memory ~ batch_size x bucket length x vocab x 8 bytes);
    max_length: the context window (default the config's max_position_embeddings, as lm-eval's HF
    backend reads it); max_gen_toks: the default generation budget (lm-eval's default, 256).

    By name, `simple_evaluate(model="expand", model_args={"pretrained": PATH, "layer_spec": "0:20,10:30"})`:
    `pretrained` and optionally one of `layer_spec`, `recipe`, `llama_pro` (the plan options of `expand eval`);
    lm-eval's argument string form splits at commas, so a layer spec with commas needs the dict form."""

    def __init__(self, model: Model | str = "smollm2", plan=None, tokenizer=None, batch_size: int | str = 8,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 pretrained: str | None = None, layer_spec: str | None = None, recipe: str | None = None,
                 llama_pro: int | None = None, device: str | None = None, max_batch_size: int | None = None):
        """device and max_batch_size are accepted because lm-eval passes them to every backend; JAX places
        the arrays itself and the batch size is fixed."""
        super().__init__()
        from expand import io
        from expand.surgery.request import plan_from_options

        if pretrained is not None:
            model = pretrained
        self.model = model if isinstance(model, Model) else io.load(model)
        config = self.model.config
        if plan is None:
            plan = plan_from_options(config, layer_spec=layer_spec, recipe=recipe,
                                     llama_pro=None if llama_pro is None else int(llama_pro), required=False)
        self.plan = plan
        self.tokenizer = tokenizer if tokenizer is not None else io.load_tokenizer(self.model)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 8
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.max_length = int(max_length or config.max_position_embeddings)
        self.max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.layer_ids = jnp.asarray(plan.layer_ids if plan is not None else np.arange(config.num_hidden_layers),
                                     jnp.int32)
        self.slot_scales = {k: jnp.asarray(v) for k, v in (plan.slot_scales() if plan is not None else {}).items()}

    # ---- what TemplateLM asks for ------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return str(self.model.source).replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """Token ids as lm-eval's HF backend makes them: special tokens as the tokenizer adds them (or as
        add_bos_token says), none when the string already starts with the prefix token."""
        options = _add_special_kwargs(add_special_tokens, self.add_bos_token)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            options["add_special_tokens"] = False
        ids = self.tokenizer.encode(string, **options)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def get_model_info(self) -> dict:
        return {"model_num_parameters": param_count(self.model.config, np.asarray(self.layer_ids)),
                "model_dtype": str(self.model.params["embed_tokens.weight"].dtype),
                "model_source": str(self.model.source),
                "plan": None if self.plan is None else self.plan.description,
                "layer_map": None if self.plan is None else self.plan.layer_map()}

    # ---- scoring -------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: [(cache key (context, continuation) or None, context tokens, continuation tokens)] ->
        [(sum of the continuation's log-probs, whether every continuation token is the argmax)]."""
        windows = [score_window(ctx, cont, self.max_length) for _, ctx, cont in requests]
        rows = list(dict.fromkeys(inputs for inputs, _, _ in windows))  # one row per distinct input
        representative = {inputs: targets for inputs, targets, _ in reversed(windows)}
        scored = self._score(rows, [representative[r] for r in rows])
        results = []
        for (key, _, _), (inputs, targets, n) in zip(requests, windows):
            picked, greedy, last_logp = scored[inputs]
            length = len(inputs)
            logprob = float(picked[length - n:length - 1].sum() + last_logp[targets[-1]])
            is_greedy = bool(greedy[length - n:length - 1].all() and int(np.argmax(last_logp)) == targets[-1])
            results.append((logprob, is_greedy))
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, (logprob, is_greedy))
        return results

    def _score(self, rows: list[tuple], targets: list[tuple]) -> dict:
        """{row: (target log-probs (T,), greedy (T,), log-softmax at the last position (V,))}, computed in
        batches of batch_size rows sorted by length, each padded to its bucket length."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        out = {}
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        with progress_bar("scoring", total=len(batches)) as advance:
            for batch in batches:
                length = bucket_length(len(rows[batch[0]]), self.max_length)
                inputs = np.zeros((self.batch_size, length), np.int32)
                target_ids = np.zeros((self.batch_size, length), np.int32)
                last = np.zeros(self.batch_size, np.int32)
                for slot, i in enumerate(batch):
                    inputs[slot, :len(rows[i])] = rows[i]
                    target_ids[slot, :len(rows[i])] = targets[i]
                    last[slot] = len(rows[i]) - 1
                picked, greedy, last_logp = jax.device_get(score_rows(
                    self.model.params, inputs, target_ids, last, self.model.config, self.layer_ids, self.slot_scales))
                for slot, i in enumerate(batch):
                    out[rows[i]] = (picked[slot], greedy[slot], last_logp[slot])
                advance()
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole documents: lm-eval's disjoint rolling windows of max_length tokens
        (each window predicts its tokens from the prefix token or the previous window's last token),
        summed per document."""
        per_document = []
        for (string,) in [request.args for request in requests]:
            windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                         prefix_token=self.prefix_token_id,
                                                         max_seq_len=self.max_length, context_len=1)
            per_document.append([(None, *lm_utils.make_disjoint_window(w)) for w in windows])
        scores = iter(self._loglikelihood_tokens([w for doc in per_document for w in doc], disable_tqdm))
        totals = []
        for request, windows in zip(requests, per_document):
            totals.append(sum(next(scores)[0] for _ in windows))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, totals[-1])
        return totals

    # ---- generation ----------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut at the first stop sequence. Requests are
        grouped by their generation settings and run batch_size at a time through `expand.generate` (a KV
        cache per slot). Each batch carries one extra row of bucket length, so that every batch of a
        bucket has the same prompt length and compiles once."""
        from expand.generate import generate

        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        results: list[str | None] = [None] * len(requests)
        with progress_bar("generating", total=len(requests)) as advance:
            for indices in groups.values():
                options = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
                until = handle_stop_sequences(options.pop("until", None), eos=eos_text)
                new_tokens = int(options.pop("max_gen_toks"))
                if new_tokens >= self.max_length:
                    raise ValueError(f"max_gen_toks {new_tokens} leaves no room for a prompt in max_length "
                                     f"{self.max_length}")
                temperature = options.get("temperature")
                sampling = dict(temperature=(1.0 if temperature is None else float(temperature))
                                if options.get("do_sample") else 0.0, top_p=float(options.get("top_p") or 1.0))
                prompts = {i: self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - new_tokens)
                           for i in indices}
                order = sorted(indices, key=lambda i: -len(prompts[i]))
                for start in range(0, len(order), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    width = bucket_length(len(prompts[batch[0]]), self.max_length - new_tokens)
                    rows = [prompts[i] for i in batch] + [[self.prefix_token_id] * width] * (
                        self.batch_size + 1 - len(batch))
                    real = len(batch)  # the rows after it only fill the batch: they stop at once

                    def stop(row: int, tokens: list[int]) -> bool:
                        return row >= real or any(text in self.tok_decode(tokens) for text in until)

                    outputs = generate(self.model.params, self.model.config, rows, new_tokens,
                                       layer_ids=self.layer_ids, slot_scales=self.slot_scales,
                                       eos_token_ids=[self.eot_token_id], stop=stop, **sampling)
                    for i, tokens in zip(batch, outputs):
                        results[i] = postprocess_generated_text(self.tok_decode(tokens), until, None)
                        self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
                        advance()
        return results

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)


# ---- running lm-eval on plans --------------------------------------------------------------------------------


def evaluate(model: Model, plans: dict, tasks: Sequence[str], *, include_path=None, num_fewshot: int | None = None,
             limit: int | float | None = None, batch_size: int = 8, max_length: int | None = None,
             bootstrap_iters: int = 100000, log_samples: bool = False) -> dict[str, dict]:
    """lm-eval's `simple_evaluate` on `model` under each plan ({name: LayerPlan or None for the model as
    stored}), all on the one copy of the weights in `model`: {name: lm-eval's results dict}.
    include_path: a directory of task YAMLs (local tasks) added to lm-eval's own."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from expand import io

    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm-eval tasks {unknown}: name tasks lm-eval lists (`lm_eval ls tasks`) or "
                         "give --include-path DIR with their YAML files")
    tokenizer = io.load_tokenizer(model)
    out = {}
    for name, plan in plans.items():
        lm = ExpandLM(model, plan, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        out[name] = simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                    limit=limit, bootstrap_iters=bootstrap_iters, log_samples=log_samples)
    return out


def results_rows(results: dict[str, dict]) -> list[dict]:
    """One row per (plan, task): {"variant", "task", metric: value, metric + "_stderr": stderr} with lm-eval's
    metric keys ("acc,none") shortened to the metric name ("acc") where the filter is "none"."""
    rows = []
    for name, result in results.items():
        for task, metrics in result["results"].items():
            row = {"variant": name, "task": task}
            for key, value in metrics.items():
                if key in ("alias", "sample_len") or not isinstance(value, (int, float)):
                    continue
                metric, _, filter_name = key.partition(",")
                row[metric if filter_name in ("", "none") else f"{metric} ({filter_name})"] = float(value)
            rows.append(row)
    return rows


def results_json(results: dict[str, dict]) -> str:
    """lm-eval's results dict as JSON (one plan), or {name: results dict} (several)."""
    import json

    data = next(iter(results.values())) if len(results) == 1 else results
    return json.dumps(data, indent=2, default=lm_utils.handle_non_serializable)
