"""User data: ``.txt`` files (language modelling) or ``.jsonl`` / ``.csv`` with text and label columns.

A directory is read whole: its ``.txt`` files make a corpus, its ``.jsonl``/``.csv`` files a
labelled set; files named ``train.*`` and ``test.*`` / ``eval.*`` / ``validation.*`` /
``valid.*`` / ``dev.*`` give the split, otherwise a fixed share is held out (by document for
text, stratified by label for labelled rows).
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from ..errors import DataError
from .datasets import LabelledTexts, TextCorpus

TEXT_SUFFIXES = (".txt",)
TABLE_SUFFIXES = (".jsonl", ".csv")
_EVAL_STEMS = ("test", "eval", "validation", "valid", "dev")


def _files(path: Path) -> list[Path]:
    if not path.exists():
        raise DataError(f"data path {str(path)!r} does not exist")
    if path.is_file():
        if path.suffix.lower() not in TEXT_SUFFIXES + TABLE_SUFFIXES:
            raise DataError(f"data file {str(path)!r} is not .txt, .jsonl or .csv")
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES + TABLE_SUFFIXES)
    if not files:
        raise DataError(f"data directory {str(path)!r} holds no .txt, .jsonl or .csv file")
    kinds = {p.suffix.lower() in TEXT_SUFFIXES for p in files}
    if len(kinds) > 1:
        raise DataError(f"data directory {str(path)!r} mixes .txt files with .jsonl/.csv files; keep one kind")
    return files


def _is_eval(p: Path) -> bool:
    return p.stem.lower() in _EVAL_STEMS


def load_path(
    path: str | Path,
    text_column: str = "text",
    label_column: str = "label",
    eval_fraction: float = 0.1,
) -> TextCorpus | LabelledTexts:
    """Read a file or directory of user data (see the module docstring)."""
    p = Path(path)
    files = _files(p)
    if files[0].suffix.lower() in TEXT_SUFFIXES:
        return _load_text(p, files, eval_fraction)
    return _load_table(p, files, text_column, label_column, max(eval_fraction, 0.2))


def _load_text(root: Path, files: list[Path], eval_fraction: float) -> TextCorpus:
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{f} is not UTF-8 text: {e}") from None
        if text.strip():
            docs.append((str(f), text))
    if not docs:
        raise DataError(f"data {str(root)!r} is empty: no text in {len(files)} file(s)")
    named_eval = [d for d in docs if _is_eval(Path(d[0]))]
    if named_eval:
        train = [d for d in docs if not _is_eval(Path(d[0]))]
        evals = named_eval
    elif len(docs) >= 10:
        k = max(1, round(eval_fraction * len(docs)))
        train, evals = docs[:-k], docs[-k:]
    else:  # few documents: hold out the tail of each by lines
        train, evals = [], []
        for name, text in docs:
            lines = text.splitlines(keepends=True)
            cut = max(1, int(len(lines) * (1 - eval_fraction))) if len(lines) > 1 else len(lines)
            head, tail = "".join(lines[:cut]), "".join(lines[cut:])
            if head.strip():
                train.append((name, head))
            if tail.strip():
                evals.append((name + " (tail)", tail))
        if not evals:  # a single line: its last characters
            name, text = docs[0]
            cut = max(1, int(len(text) * (1 - eval_fraction)))
            train, evals = [(name, text[:cut])], [(name + " (tail)", text[cut:])]
    if not train:
        raise DataError(f"data {str(root)!r} has no training text (only held-out files)")
    return TextCorpus(
        [t for _, t in train], [t for _, t in evals], f"text files at {root}",
        [n for n, _ in train], [n for n, _ in evals],
    )


def _rows(f: Path, text_column: str, label_column: str) -> list[tuple[str, str]]:
    try:
        rows = _read_records(f)
    except UnicodeDecodeError as e:
        raise DataError(f"{f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DataError(f"{f} does not parse as CSV: {e}") from None
    out = []
    for i, r in enumerate(rows, 1):
        for col in (text_column, label_column):
            if col not in r:
                raise DataError(
                    f"{f}: row {i} has no column {col!r} (columns: {', '.join(map(str, r))}); "
                    "choose the columns with --text-column / --label-column"
                )
        text, label = r[text_column], r[label_column]
        if text is None or label is None or not str(text).strip():
            continue
        out.append((str(text), str(label)))
    return out


def _read_records(f: Path) -> list[dict]:
    """The rows of a .jsonl (one JSON object a line) or .csv (header row) file."""
    rows: list[dict] = []
    if f.suffix.lower() == ".jsonl":
        with f.open(encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{i} is not valid JSON: {e}") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{f}:{i} is not a JSON object")
                rows.append(obj)
        return rows
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, f.stat().st_size + 1))  # one document may be a whole long text
    try:
        with f.open(encoding="utf-8", newline="") as fh:
            return list(csv.DictReader(fh))
    finally:
        csv.field_size_limit(limit)


def _load_table(root: Path, files: list[Path], text_column: str, label_column: str, eval_fraction: float) -> LabelledTexts:
    named_eval = [f for f in files if _is_eval(f)]
    train_rows: list[tuple[str, str]] = []
    eval_rows: list[tuple[str, str]] = []
    for f in files:
        (eval_rows if f in named_eval else train_rows).extend(_rows(f, text_column, label_column))
    all_rows = train_rows + eval_rows
    if not all_rows:
        raise DataError(f"data {str(root)!r} is empty: no row with a non-empty {text_column!r} and {label_column!r}")
    labels = sorted({lab for _, lab in all_rows}, key=lambda s: (not s.lstrip("-").isdigit(), int(s) if s.lstrip("-").isdigit() else 0, s))
    if len(labels) < 2:
        raise DataError(
            f"label column {label_column!r} of {str(root)!r} has a single class ({labels[0]!r}); "
            "classification needs at least two"
        )
    if not named_eval:  # stratified hold-out, fixed order (independent of the run seed)
        by_label: dict[str, list[tuple[str, str]]] = {}
        for r in train_rows:
            by_label.setdefault(r[1], []).append(r)
        rng = random.Random("lowrank-user-split")
        train_rows, eval_rows = [], []
        for lab in labels:
            rs = by_label[lab]
            rng.shuffle(rs)
            k = int(round(eval_fraction * len(rs))) if len(rs) >= 2 else 0
            eval_rows += rs[:k]
            train_rows += rs[k:]
        rng.shuffle(train_rows)
    if not train_rows:
        raise DataError(f"data {str(root)!r} has no training rows (only held-out files)")
    if not eval_rows:
        raise DataError(f"data {str(root)!r} is too small to hold out evaluation rows; give a test.jsonl/test.csv")
    index = {lab: i for i, lab in enumerate(labels)}
    return LabelledTexts(
        [t for t, _ in train_rows], [index[lab] for _, lab in train_rows],
        [t for t, _ in eval_rows], [index[lab] for _, lab in eval_rows],
        labels, f"labelled rows at {root} (text={text_column!r}, label={label_column!r})",
    )


__all__ = ["load_path"]
