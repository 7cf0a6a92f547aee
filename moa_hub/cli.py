"""The ``moa-hub`` command line: parse, validate, call one library function."""

from __future__ import annotations

import importlib
import logging
import sys

import typer

from .errors import MoaHubError

app = typer.Typer(
    name="moa-hub",
    help="Compress the attention of a Hugging Face causal LM with MoA (Mixture of Attention spans).\n\n"
    "Example: moa-hub convert meta-llama/Llama-3.1-8B-Instruct --output llama-moa --push",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Each module defines register(app); the list is the one place that names them.
COMMAND_MODULES = ["export", "hub", "convert", "profile", "optimize", "validate", "eval"]


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        importlib.import_module(f"moa_hub.commands.{name}").register(app)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> None:
    _register_commands()
    try:
        app(args=argv, prog_name="moa-hub")
    except MoaHubError as err:
        typer.secho(f"Error: {err}", fg=typer.colors.RED, err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
