"""Built-in and user datasets, and the tasks built from them.

    from lowrank.data import load_data, load_task, ByteTokenizer
    data = load_data("stdlib-docstrings")                # or "stdlib-text", or a path
    task = load_task(data, tokenizer, seq_len=64, seed=0)
    batch = task.train_batch(0, batch_size=16)           # model(**batch).loss is the loss
    task.evaluate(model)                                 # {"eval_loss": ..., "eval_accuracy": ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import DataError
from .datasets import LabelledTexts, TextCorpus
from .files import load_path
from .stdlib import stdlib_docstrings, stdlib_text
from .tasks import ClassificationTask, LMTask
from .tokenizers import ByteTokenizer, HFTokenizer

#: built-in datasets: name -> (builder, what it is)
BUILTIN_DATA: dict[str, tuple[Callable[[], TextCorpus | LabelledTexts], str]] = {
    "stdlib-text": (stdlib_text, "language modelling on the standard library's Python source"),
    "stdlib-docstrings": (stdlib_docstrings, "classify standard-library docstrings by package"),
}


def load_data(
    name_or_path: str | Path | TextCorpus | LabelledTexts,
    text_column: str = "text",
    label_column: str = "label",
) -> TextCorpus | LabelledTexts:
    """A built-in dataset by name, or user data from a ``.txt``/``.jsonl``/``.csv`` file or directory."""
    if isinstance(name_or_path, (TextCorpus, LabelledTexts)):
        return name_or_path
    name = str(name_or_path)
    if name in BUILTIN_DATA:
        return BUILTIN_DATA[name][0]()
    return load_path(check_data_name(name), text_column, label_column)


def check_data_name(name: str) -> Path | None:
    """A built-in dataset (None) or an existing path; DataError otherwise."""
    if name in BUILTIN_DATA:
        return None
    p = Path(name).expanduser()
    if p.exists():
        return p
    if "/" in name or p.suffix:
        raise DataError(f"data path {name!r} does not exist")
    raise DataError(f"data {name!r} is neither a built-in dataset ({', '.join(BUILTIN_DATA)}) nor an existing path")


def load_task(
    data: str | Path | TextCorpus | LabelledTexts,
    tokenizer: Any,
    seq_len: int = 128,
    seed: int = 0,
    *,
    text_column: str = "text",
    label_column: str = "label",
    eval_size: int | None = None,
) -> LMTask | ClassificationTask:
    """Tokenise ``data`` into a task: text -> :class:`LMTask`, labelled rows -> :class:`ClassificationTask`.

    ``eval_size`` caps the held-out set (windows for LM, examples for classification).
    """
    raw = load_data(data, text_column, label_column)
    if isinstance(raw, TextCorpus):
        return LMTask(raw, tokenizer, seq_len, seed, eval_windows=eval_size or 64)
    return ClassificationTask(raw, tokenizer, seq_len, seed, eval_examples=eval_size)


__all__ = [
    "BUILTIN_DATA",
    "check_data_name",
    "load_data",
    "load_task",
    "TextCorpus",
    "LabelledTexts",
    "LMTask",
    "ClassificationTask",
    "ByteTokenizer",
    "HFTokenizer",
    "stdlib_docstrings",
    "stdlib_text",
]
