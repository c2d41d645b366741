"""`sinkquant recipe validate|show` and `sinkquant inspect`: read files, print what they hold."""

from __future__ import annotations

import json

import click

from .app import main, module_names_text


@main.group()
def recipe():
    """Check and show recipe files."""


@recipe.command("validate")
@click.argument("file")
def recipe_validate(file):
    """Validate FILE; errors name the line and key."""
    from ..recipe import load_recipe

    load_recipe(file)
    click.echo(f"{file}: ok")


@recipe.command("show")
@click.argument("file")
def recipe_show(file):
    """Print FILE with every default filled in."""
    from ..recipe import load_recipe

    click.echo(load_recipe(file).to_yaml(), nl=False)


@main.command()
@click.argument("checkpoint")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def inspect(checkpoint, as_json):
    """Show what a sinkquant CHECKPOINT holds."""
    from ..pipeline import inspect_checkpoint

    info = inspect_checkpoint(checkpoint)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    info["not_converted"] = module_names_text(info["not_converted"])
    width = max(len(k) for k in info)
    for key, value in info.items():
        click.echo(f"{key.ljust(width)}  {value}")
