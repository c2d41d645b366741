"""The `sinkquant` group: one line per error, progress only on a terminal, options shared by commands."""

from __future__ import annotations

import os
import signal
import sys
import traceback
import warnings

import click

from .. import __version__
from ..compat import check_transformers
from ..errors import SinkQuantError

DTYPE_CHOICE = click.Choice(["auto", "float32", "bfloat16", "float16"])
NO_VERIFY_HELP = "Load a sinkquant checkpoint even if its files do not match the sha256 manifest."


def _quiet_libraries() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def progress() -> bool:
    """Progress bars only on a terminal: in a log or a pipe they are noise around the lines that matter."""
    return sys.stderr.isatty()


def _one_line(text: str) -> str:
    """A message as one line: the CLI promises one line per error, whatever a message was built from."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as `warning: ...`, one line each, like errors (no source file and line of library code)."""
    text = str(message).strip().splitlines()
    click.echo(f"warning: {text[0] if text else category.__name__}", err=True)


def module_names_text(names: list[str]) -> str:
    """Module names for a line people read: those of one block stack counted under its name (a
    multimodal model's vision tower skips a few hundred linear layers), the rest listed."""
    if not names:
        return "none"
    stacks: dict[str, int] = {}
    for name in names:
        parts = name.split(".")
        cut = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        key = name if cut is None else ".".join(parts[:cut]) + ".*"
        stacks[key] = stacks.get(key, 0) + 1
    return ", ".join(
        key if count == 1 and not key.endswith("*") else f"{key} ({count})" for key, count in stacks.items()
    )


def execution_options(command):
    """`--device` and `--memory-budget`, shared by the commands that run a model."""
    command = click.option(
        "--memory-budget",
        default=None,
        type=click.IntRange(min=0),
        metavar="MIB",
        help="Memory the hidden states of all sequences may hold before they spill to a temporary folder "
        "(default: a quarter of the memory limit).",
    )(command)
    return click.option(
        "--device",
        default="auto",
        show_default=True,
        help="Where each decoder layer computes: cpu, cuda, cuda:N or auto (CUDA when there is a GPU).",
    )(command)


def execution(device: str, memory_budget: int | None):
    from ..stream.host import Execution

    if device != "auto" and device != "cpu" and not device.startswith("cuda"):
        from ..errors import InputError

        raise InputError(f"--device must be cpu, cuda, cuda:N or auto (got {device!r})")
    return Execution(device=device, memory_budget=None if memory_budget is None else memory_budget << 20)


def _terminated(signum, frame) -> None:
    """SIGTERM (a job scheduler, `kill`) unwinds like Ctrl-C: temporary folders and spill files go."""
    raise KeyboardInterrupt


class _Group(click.Group):
    """Turns every error into one line on stderr (a traceback only with --debug)."""

    def invoke(self, ctx: click.Context):
        debug = "--debug" in sys.argv[1:] or bool(ctx.params.get("debug"))
        try:
            with warnings.catch_warnings():
                if not debug:
                    warnings.showwarning = _one_line_warning
                return super().invoke(ctx)
        except click.exceptions.NoArgsIsHelpError:
            raise
        except click.UsageError as exc:  # a bad option or argument: one line too, not click's usage block
            where = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            click.echo(f"error: {exc.format_message()} (see '{where} --help')", err=True)
            ctx.exit(exc.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except SinkQuantError as exc:
            if debug:
                traceback.print_exc()
            click.echo(f"error: {_one_line(str(exc))}", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was written", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader went away (`sinkquant inspect CKPT | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            ctx.exit(141)  # as a shell reports a process ended by SIGPIPE
        except Exception as exc:  # an unexpected failure: still one line unless --debug
            if debug:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            click.echo(
                f"error: {type(exc).__name__}: {first} (re-run with --debug for the traceback)", err=True
            )
            ctx.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sinkquant")
@click.option("--debug", is_flag=True, help="Show tracebacks on errors.")
def main(debug: bool) -> None:
    """Sink-aware quantization for Hugging Face causal language models."""
    _quiet_libraries()
    check_transformers()
    signal.signal(signal.SIGTERM, _terminated)
