"""Datasets of the local lm-eval tasks in this directory, read from the JSONL files beside this file (so
the tasks work from any working directory, with no hub)."""

from pathlib import Path

import datasets

HERE = Path(__file__).parent


def _jsonl(name: str) -> datasets.DatasetDict:
    return datasets.load_dataset("json", data_files={"test": str(HERE / name)})


def multiple_choice(**metadata) -> datasets.DatasetDict:
    return _jsonl("expand_mc.jsonl")


def text(**metadata) -> datasets.DatasetDict:
    return _jsonl("expand_text.jsonl")
