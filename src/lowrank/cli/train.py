"""``lowrank train``: one method on one task, from flags or a TOML/YAML config file."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from . import app


@app.command("train")
def train_cmd(
    task: Optional[str] = typer.Option(None, "--task", help="finetune (pretrained weights) or pretrain (from scratch); default finetune"),
    model: Optional[str] = typer.Option(None, "--model", help="minilm, llama-tiny, llama-small, or a local Hugging Face checkpoint"),
    data: Optional[str] = typer.Option(None, "--data", help="stdlib-docstrings, stdlib-text, or a .txt/.jsonl/.csv file or directory"),
    method: Optional[str] = typer.Option(None, "--method", help="a recipe: full, head, lora, dora, galore, sltrain, relora, ... (default lora)"),
    method_options: Optional[str] = typer.Option(None, "--method-options", help="recipe options: JSON object or key=value,key=value"),
    rank: Optional[int] = typer.Option(None, "--rank", help="rank (default: the recipe's; or rank in --method-options, not both)"),
    optimizer: Optional[str] = typer.Option(None, "--optimizer", help="adamw, or a lowrank.optim optimizer (replaces the recipe's)"),
    optimizer_options: Optional[str] = typer.Option(None, "--optimizer-options", help="optimizer options: JSON or key=value list"),
    steps: Optional[int] = typer.Option(None, "--steps", help="optimizer steps (default 100)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="examples per micro-batch (default 16)"),
    grad_accum: Optional[int] = typer.Option(None, "--grad-accum", help="micro-batches per step (default 1)"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", help="tokens per example (default 64 classification, 128 LM)"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate (default: the recipe's)"),
    lr_schedule: Optional[str] = typer.Option(None, "--lr-schedule", help="cosine (default), linear or constant, after warmup"),
    warmup_steps: Optional[int] = typer.Option(None, "--warmup-steps", help="linear warmup steps (default 10%, at most 100)"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="max gradient norm (default 1.0; 0 disables)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of model init, data order and the method (default 0; 0 to 2**32-1)"),
    eval_every: Optional[int] = typer.Option(None, "--eval-every", help="evaluate every N steps (default: at the end only)"),
    eval_size: Optional[int] = typer.Option(None, "--eval-size", help="cap on held-out examples (classification) or windows (LM)"),
    checkpoint_every: Optional[int] = typer.Option(None, "--checkpoint-every", help="checkpoint every N steps (default 100; 0: final only)"),
    keep_checkpoints: Optional[int] = typer.Option(None, "--keep-checkpoints", help="checkpoints kept (default 2; 0 keeps all)"),
    out: Optional[str] = typer.Option(None, "--out", help="output directory (metrics.jsonl, checkpoints/, final/)"),
    resume: bool = typer.Option(False, "--resume", help="continue from the newest good checkpoint in --out"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a previous run in --out"),
    text_column: Optional[str] = typer.Option(None, "--text-column", help="text column of .jsonl/.csv data (default text)"),
    label_column: Optional[str] = typer.Option(None, "--label-column", help="label column of .jsonl/.csv data (default label)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu (default), cuda[:N] or auto"),
    no_progress: bool = typer.Option(False, "--no-progress", help="no progress bar"),
    config: Optional[Path] = typer.Option(None, "--config", help="TOML/YAML file of these options (flags override it)"),
) -> None:
    """Train one METHOD on one task; writes OUT/metrics.jsonl, OUT/checkpoints/ and OUT/final/."""
    from ..train import TrainConfig, Trainer, keep_freed_heap, parse_options, read_config_file

    values: dict[str, Any] = read_config_file(config) if config is not None else {}
    for key in ("method_options", "optimizer_options"):
        if isinstance(values.get(key), str):
            values[key] = parse_options(values[key])
    flags = {
        "task": task, "model": model, "data": data, "method": method, "rank": rank, "optimizer": optimizer,
        "steps": steps, "batch_size": batch_size, "grad_accum": grad_accum, "seq_len": seq_len, "lr": lr,
        "lr_schedule": lr_schedule, "warmup_steps": warmup_steps, "grad_clip": grad_clip, "seed": seed,
        "eval_every": eval_every, "eval_size": eval_size, "checkpoint_every": checkpoint_every,
        "keep_checkpoints": keep_checkpoints, "out": out, "text_column": text_column,
        "label_column": label_column, "threads": threads, "device": device,
    }
    values.update({k: v for k, v in flags.items() if v is not None})
    if method_options is not None:
        values["method_options"] = parse_options(method_options)
    if optimizer_options is not None:
        values["optimizer_options"] = parse_options(optimizer_options)
    if resume:
        values["resume"] = True
    if overwrite:
        values["overwrite"] = True
    if no_progress:
        values["progress"] = False
    if "out" not in values:
        raise typer.BadParameter("--out is required (or `out` in the --config file)", param_hint="--out")
    keep_freed_heap()  # this process only trains: reuse freed activations instead of faulting pages in
    trainer = Trainer(TrainConfig.from_dict(values))
    typer.echo(f"task:   {trainer.task.describe()}", err=True)
    typer.echo(
        f"model:  {trainer.loaded.describe()}; method {trainer.recipe.name} ({trainer.recipe.kind}): "
        f"{trainer.trainable_params:,} trainable of {trainer.total_params:,}",
        err=True,
    )
    result = trainer.fit()
    ev = ", ".join(f"{k} {v:.4f}" for k, v in result.final_eval.items())
    s = result.summary
    typer.echo(
        f"step {result.step}: {ev}; median step {s['median_step_s']:.3f} s, {s['tokens_per_s']:,.0f} tokens/s"
        if s["median_step_s"] is not None else f"step {result.step}: {ev}"
    )
    where = f"{result.out}/final" if trainer.config.save_final else str(result.out)
    typer.echo(f"wrote {result.out}/metrics.jsonl and {where}")
