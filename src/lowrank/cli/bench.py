"""``lowrank bench``: compare methods side by side on one task; prints the table, writes the reports."""

from __future__ import annotations

from typing import Optional

import typer

from . import app


@app.command("bench")
def bench_cmd(
    task: str = typer.Option("finetune", "--task", help="finetune (MiniLM on stdlib-docstrings) or pretrain (llama-small on stdlib-text)"),
    methods: Optional[str] = typer.Option(None, "--methods", help="comma-separated recipes (default: a representative set)"),
    steps: Optional[int] = typer.Option(None, "--steps", help="steps per method (default 100 finetune, 150 pretrain)"),
    model: Optional[str] = typer.Option(None, "--model", help="built-in model name or local checkpoint"),
    data: Optional[str] = typer.Option(None, "--data", help="built-in dataset name or a path"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="default 16 finetune, 8 pretrain"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="default 64 finetune, 128 pretrain"),
    rank: Optional[int] = typer.Option(None, "--rank", help="rank for every low-rank method (default: each recipe's)"),
    method_options: Optional[str] = typer.Option(
        None, "--method-options",
        help='options for every method (key=value or JSON), or per method: \'{"lora": {"alpha": 16}}\'',
    ),
    seed: int = typer.Option(0, "--seed"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every"),
    eval_size: Optional[int] = typer.Option(None, "--eval-size"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads per method"),
    device: str = typer.Option("cpu", "--device", help="cpu (default), cuda[:N] or auto"),
    in_process: bool = typer.Option(False, "--in-process", help="run methods in this process (faster; peak memory less exact)"),
    no_progress: bool = typer.Option(False, "--no-progress"),
    out: str = typer.Option("runs/bench", "--out", help="output directory"),
) -> None:
    """Run several METHODS on the same task and budget; print and write the comparison table."""
    from rich.console import Console
    from rich.table import Table

    from ..bench import BenchConfig, run_bench
    from ..bench.report import table_columns, table_rows
    from ..train import parse_options

    names = [m.strip() for m in methods.split(",") if m.strip()] if methods is not None else None
    cfg = BenchConfig(
        out=out, task=task, methods=names, model=model, data=data, steps=steps, batch_size=batch_size,
        seq_len=seq_len, seed=seed, rank=rank, method_options=parse_options(method_options),
        eval_every=eval_every, eval_size=eval_size, isolate=not in_process, threads=threads, device=device,
        progress=not no_progress,
    )
    result = run_bench(cfg)
    table = Table(title=f"lowrank bench: {result.context['task']} — {result.context['steps']} steps, seed {seed}")
    for i, (_, h) in enumerate(table_columns(result)):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in table_rows(result):
        table.add_row(*row)
    console = Console(width=max(200, Console().width))
    console.print(table)
    ctx = result.context
    console.print(
        f"{ctx['model']}\n{ctx['data']}\n"
        f"total {ctx['total_s']:.0f} s; peak memory = {'per-process ru_maxrss' if ctx['isolate'] else 'sampled RSS'}"
    )
    if result.skipped:
        console.print(f"not installed, skipped: {', '.join(result.skipped)}")
    console.print(f"wrote {', '.join(str(p) for k, p in result.files.items() if k != 'json')}")
    if any(r["status"] != "ok" for r in result.rows):
        raise typer.Exit(1)
