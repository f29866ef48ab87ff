"""`lowrank bench` end to end on llama-tiny: the table, CSV, PNG and HTML, per-process memory."""

from __future__ import annotations

import csv
import re

import pytest
from typer.testing import CliRunner

from lowrank.bench import COLUMNS, DEFAULT_METHODS, resolve_methods, run_bench
from lowrank.cli import _load_commands, app
from lowrank.errors import ConfigError, LowRankError, UnknownNameError

_load_commands()


def test_bench_cli_two_methods_writes_all_reports(tmp_path):
    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["bench", "--task", "pretrain", "--model", "llama-tiny", "--methods", "full,lora",
                                   "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-size", "4",
                                   "--threads", "1", "--no-progress", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("results.md", "results.csv", "loss.png", "report.html"):
        assert (out / f).stat().st_size > 0, f
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["method"] for r in rows] == ["full", "lora"]
    assert set(COLUMNS) <= set(rows[0])
    full, lora = rows
    assert float(full["gap_eval_loss"]) == 0.0 and all(r["status"] == "ok" for r in rows)
    assert int(lora["trainable_params"]) < int(full["trainable_params"])
    assert int(lora["optimizer_state_bytes"]) < int(full["optimizer_state_bytes"])
    # each method ran in its own process: its own peak RSS, at least the size of torch itself
    assert all(int(r["peak_memory_bytes"]) > 100e6 for r in rows)
    md = (out / "results.md").read_text()
    assert re.search(r"^\| lora \|", md, re.M) and "peak resident set size of each method's own process" in md
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "<table>" in html
    assert not re.search(r"(src|href)=\"https?://", html)  # self-contained
    assert "lora" in res.output and "eval loss" in res.output  # the printed table


def test_bench_in_process_classification_has_accuracy(tmp_path):
    result = run_bench(task="finetune", model="llama-tiny", methods=["head", "lora"], steps=3, batch_size=4,
                       seq_len=16, eval_size=16, isolate=False, progress=False, out=str(tmp_path / "b"),
                       method_options={"lora": {"rank": 2}})
    rows = {r["method"]: r for r in result.rows}
    assert all(0.0 <= r["eval_accuracy"] <= 1.0 for r in rows.values())
    assert rows["lora"]["_summary"]["recipe_info"]["rank"] == 2
    assert "gap_eval_accuracy" not in [c for c, _ in __import__("lowrank.bench.report", fromlist=["x"]).table_columns(result)]
    assert "eval accuracy" in (tmp_path / "b" / "results.md").read_text()


def test_bench_rejects_bad_method_lists_before_running():
    with pytest.raises(UnknownNameError, match="Did you mean.*'lora'"):
        resolve_methods("finetune", ["loar"])
    with pytest.raises(ConfigError, match="does not apply to task 'pretrain'"):
        resolve_methods("pretrain", ["head"])
    run, skipped = resolve_methods("finetune", None)
    assert run and set(run) | set(skipped) == set(DEFAULT_METHODS["finetune"]) and "full" in run
    with pytest.raises(ConfigError, match="names no method"):
        resolve_methods("pretrain", [])
    with pytest.raises(ConfigError, match="listed twice"):
        resolve_methods("pretrain", ["lora", "lora"])


@pytest.mark.parametrize("kw, match", [
    ({"method_options": {"dora": {"alpha": 16}}}, "'dora', not among --methods"),
    ({"model": "nosuch"}, "neither a built-in model"),
    ({"data": "nosuch.txt"}, "does not exist"),
])
def test_bench_checks_inputs_before_running(tmp_path, kw, match):
    out = tmp_path / "b"
    with pytest.raises(LowRankError, match=match):
        run_bench(task="pretrain", methods=["lora"], steps=1, out=str(out), **kw)
    assert not out.exists()
