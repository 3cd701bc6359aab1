"""A tiny byte-level BPE tokenizer (300 tokens, trained on the local lm-eval task texts), saved beside a
tiny random checkpoint so that lm-eval and GGUF export have a real tokenizer whose ids fit the model."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).parent / "data" / "lm_eval"
VOCAB_SIZE = 300
SPECIAL = ["<|endoftext|>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny config's bos_token_id 1 and eos_token_id 2
CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant: {% endif %}")


def corpus() -> list[str]:
    lines = [json.loads(line) for name in ("expand_mc.jsonl", "expand_text.jsonl")
             for line in (DATA / name).read_text().splitlines()]
    return [d.get("text") or " ".join([d["question"], *d["choices"]]) for d in lines]


def save_tiny_tokenizer(directory: Path) -> Path:
    """Train the tokenizer (deterministic) and save it with transformers' save_pretrained into `directory`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(directory))
    return Path(directory)
