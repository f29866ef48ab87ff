"""The bench's outputs: results.csv, results.md, loss.png and a self-contained report.html."""

from __future__ import annotations

import base64
import csv
import html
import json
import math
from pathlib import Path
from typing import Any

from .runner import COLUMNS, BenchResult

#: (column, header) of the human-readable table
TABLE = [
    ("method", "method"),
    ("trainable_params", "trainable params"),
    ("optimizer_state_bytes", "optimizer state"),
    ("train_state_bytes", "weights+grads+state"),
    ("peak_memory_bytes", "peak memory"),
    ("median_step_s", "median step"),
    ("tokens_per_s", "tokens/s"),
    ("eval_loss", "eval loss"),
    ("eval_accuracy", "eval accuracy"),
    ("gap_eval_loss", "Δ loss vs full"),
    ("gap_eval_accuracy", "Δ accuracy vs full"),
]


def _count(n: float) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{int(n)}"


def _bytes(n: float) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def fmt(col: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if col == "trainable_params":
        return _count(v)
    if col.endswith("_bytes"):
        return _bytes(v)
    if col == "median_step_s":
        return f"{v:.3f} s"
    if col == "tokens_per_s":
        return f"{v:,.0f}"
    if col == "eval_accuracy":
        return f"{100 * v:.1f}%"
    if col == "gap_eval_accuracy":
        return f"{100 * v:+.1f} pt"
    if col == "gap_eval_loss":
        return f"{v:+.4f}"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def table_columns(result: BenchResult) -> list[tuple[str, str]]:
    cls = any(r.get("eval_accuracy") is not None for r in result.rows)
    has_full = any(r.get("gap_eval_loss") is not None for r in result.rows)
    cols = []
    for c, h in TABLE:
        if c in ("eval_accuracy", "gap_eval_accuracy") and not cls:
            continue
        if c.startswith("gap_") and not has_full:
            continue
        cols.append((c, h))
    return cols


def table_rows(result: BenchResult) -> list[list[str]]:
    cols = table_columns(result)
    out = []
    for r in result.rows:
        if r["status"] != "ok":
            out.append([r["method"]] + ["–"] * (len(cols) - 2) + [f"failed: {r['status']}"[:80]])
        else:
            out.append([fmt(c, r.get(c)) for c, _ in cols])
    return out


def _notes(result: BenchResult) -> list[str]:
    ctx = result.context
    notes = [
        f"Task `{ctx['task']}`: {ctx['data']}.",
        f"Model: {ctx['model']}.",
        f"Every method: {ctx['steps']} steps of {ctx['batch_size']} examples x up to {ctx['seq_len']} tokens, "
        f"seed {ctx['seed']}, the same data order; evaluation every {ctx['eval_every']} steps and at the end.",
        f"Peak memory: {ctx['memory_note']}.",
        "Optimizer state: bytes held in the optimizer's state tensors; weights+grads+state: every weight, a "
        "gradient for each trainable one, and the optimizer state, counted from the tensors.",
        f"Wall time {ctx['total_s']:.0f} s in all: training loops {ctx['loop_s']:.0f} s (forward/backward/optimizer "
        f"{ctx['compute_s']:.0f} s, evaluation {ctx['eval_s']:.0f} s), the rest is process start, imports, model and "
        f"data loading and the recipe's set-up ({ctx['setup_s']:.0f} s of it inside the runs).",
    ]
    frac = ctx.get("outside_compute_fraction_of_loops")
    if frac is not None:
        notes.append(f"Time in the training loops outside forward/backward/optimizer and evaluation (data, logging): {100 * frac:.2f}%.")
    if result.skipped:
        notes.append(f"Default methods not available in this installation (skipped): {', '.join(result.skipped)}.")
    failed = [r for r in result.rows if r["status"] != "ok"]
    for r in failed:
        notes.append(f"`{r['method']}` failed: {r['status']}")
    return notes


def markdown(result: BenchResult) -> str:
    cols = table_columns(result)
    lines = [f"# lowrank bench: {result.context['task']}", ""]
    lines.append("| " + " | ".join(h for _, h in cols) + " |")
    lines.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(cols))) + "|")
    for row in table_rows(result):
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- {n}" for n in _notes(result)]
    return "\n".join(lines) + "\n"


def write_csv(result: BenchResult, path: Path) -> None:
    with path.open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(COLUMNS)
        for r in result.rows:
            w.writerow(["" if r.get(c) is None else r.get(c) for c in COLUMNS])


def _ema(xs: list[float], alpha: float) -> list[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else alpha * x + (1 - alpha) * m
        out.append(m)
    return out


def plot(result: BenchResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in result.rows if r["status"] == "ok"]
    cls = any(r.get("eval_accuracy") is not None for r in ok)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.6))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, r in enumerate(ok):
        color = colors[i % len(colors)]
        train = [(m["step"], m["loss"]) for m in r["_metrics"] if "loss" in m]
        evals = [(m["step"], m["eval_loss"]) for m in r["_metrics"] if "eval_loss" in m]
        if train:
            steps, losses = zip(*train)
            ax1.plot(steps, _ema(list(losses), 0.2), color=color, lw=1.6, label=r["method"])
        if evals:
            es, el = zip(*evals)
            ax1.plot(es, el, "o--", color=color, ms=4, lw=0.8)
        x = (r.get("peak_memory_bytes") or 0) / 1e6
        y = 100 * r["eval_accuracy"] if cls else r["eval_loss"]
        ax2.scatter([x], [y], color=color, s=40)
        ax2.annotate(r["method"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=9)
    ax1.set_xlabel("step")
    ax1.set_ylabel("training loss (EMA 0.2); dashed: eval loss")
    ax1.set_title("loss curves")
    ax1.grid(alpha=0.3)
    if ok:
        ax1.legend(fontsize=8)
    ax2.set_xlabel("peak memory (MB)")
    ax2.set_ylabel("eval accuracy (%)" if cls else "eval loss")
    ax2.set_title("quality against memory")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"lowrank bench: {result.context['task']} ({result.context['steps']} steps)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report_html(result: BenchResult, png: Path) -> str:
    cols = table_columns(result)
    img = base64.b64encode(png.read_bytes()).decode("ascii") if png.exists() else ""
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h in cols)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in row) + "</tr>" for row in table_rows(result)
    )
    notes = "".join(f"<li>{html.escape(n).replace('`', '')}</li>" for n in _notes(result))
    raw = json.dumps(
        [{k: v for k, v in r.items() if not k.startswith("_")} for r in result.rows], indent=1, default=str
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>lowrank bench: {html.escape(result.context['task'])}</title>
<style>
body {{ font-family: system-ui, -apple-system, sans-serif; margin: 2rem auto; max-width: 72rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.92rem; }}
th, td {{ padding: 0.3rem 0.7rem; border-bottom: 1px solid #ddd; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; margin-top: 1rem; }}
pre {{ background: #f7f7f7; padding: 0.8rem; overflow-x: auto; font-size: 0.8rem; }}
</style></head><body>
<h1>lowrank bench: {html.escape(result.context['task'])}</h1>
<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<ul>{notes}</ul>
<img alt="loss curves and quality against memory" src="data:image/png;base64,{img}">
<h2>Raw results</h2><pre>{html.escape(raw)}</pre>
</body></html>
"""


#: the files :func:`write_reports` writes into the bench's --out
REPORT_FILES = {"csv": "results.csv", "md": "results.md", "png": "loss.png", "html": "report.html", "json": "results.json"}


def write_reports(result: BenchResult) -> dict[str, Path]:
    files = {k: result.out / name for k, name in REPORT_FILES.items()}
    write_csv(result, files["csv"])
    files["md"].write_text(markdown(result), encoding="utf-8")
    plot(result, files["png"])
    files["html"].write_text(report_html(result, files["png"]), encoding="utf-8")
    files["json"].write_text(
        json.dumps(
            {"context": result.context, "rows": [{k: v for k, v in r.items() if k != "_metrics"} for r in result.rows]},
            indent=2,
            default=str,
        ),
        encoding="utf-8",
    )
    return files


__all__ = ["REPORT_FILES", "write_reports", "markdown", "table_rows", "table_columns", "fmt"]
