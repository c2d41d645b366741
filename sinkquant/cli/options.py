"""Options shared by the commands that score what they wrote."""

import click


def eval_options(help_text: str):
    """`--eval TEXT` and `--eval-tokens`, shared by the commands that score what they wrote."""

    def apply(command):
        command = click.option(
            "--eval-tokens",
            default=16384,
            show_default=True,
            type=click.IntRange(min=2),
            help="Text tokens for --eval.",
        )(command)
        return click.option("--eval", "eval_dataset", default=None, help=help_text)(command)

    return apply
