"""``lowrank methods`` and ``lowrank info``."""

from __future__ import annotations

import typer
from rich.console import Console
from rich.table import Table

from ..errors import UnknownNameError
from ..registry import get_method, inits, method_info, methods
from . import app


@app.command("methods")
def list_methods() -> None:
    """List the registered adapter methods and initialisation strategies."""
    table = Table(title="methods")
    table.add_column("name")
    table.add_column("trainable per layer")
    table.add_column("merge")
    table.add_column("paper")
    for name in methods():
        cls = get_method(name)
        table.add_row(name, cls.params_formula, "yes" if cls.mergeable else "no", cls.paper.split(" (")[0])
    console = Console()
    console.print(table)
    table = Table(title="inits")
    table.add_column("name")
    table.add_column("what")
    for name in inits():
        info = method_info(name)
        table.add_row(name, str(info.notes.get("what", info.paper)))
    console.print(table)
    from ..recipes import get_recipe, recipes

    table = Table(title="training recipes (lowrank train/bench --method): every adapter and init above, and")
    table.add_column("name")
    table.add_column("kind")
    table.add_column("tasks")
    table.add_column("what")
    adapters = set(methods()) | set(inits())
    for name in recipes():
        r = get_recipe(name)
        if name not in adapters:
            table.add_row(name, r.kind, ", ".join(r.tasks), r.description)
    console.print(table)


@app.command("info")
def info(method: str = typer.Argument(..., help="a method, init or training recipe name")) -> None:
    """Paper, formula, trainable-parameter formula and options of METHOD (or what a recipe does)."""
    import inspect

    from ..recipes import get_recipe, recipes

    try:
        typer.echo(str(method_info(method)))
        return
    except UnknownNameError:
        if method not in recipes():
            raise UnknownNameError("method, init or recipe", method, set(methods()) | set(inits()) | set(recipes())) from None
    r = get_recipe(method)
    params = inspect.signature(r.build).parameters
    options = {k: p.default for k, p in params.items()
               if k not in ("model", "task", "calibration", "total_steps") and p.kind is p.KEYWORD_ONLY}
    typer.echo(f"{r.name} ({r.kind} recipe; tasks: {', '.join(r.tasks)})\n  {r.description}")
    if options:
        typer.echo("  options: " + ", ".join(f"{k}={v!r}" if v is not inspect.Parameter.empty else k
                                           for k, v in options.items()))
