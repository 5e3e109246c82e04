"""The sdltag command line: thin Typer commands over the library.

Each command group lives in ``sdltag/commands/<name>.py`` and registers itself here.
"""

from __future__ import annotations

from sdltag._platform import single_thread_blas, tune_openblas

tune_openblas()  # both must run before anything imports numpy
single_thread_blas()

import importlib  # noqa: E402

import typer  # noqa: E402

from sdltag import __version__  # noqa: E402

app = typer.Typer(
    name="sdltag",
    help=(
        "Tag folders of images with the labels an SDL model was trained on and with any labels "
        "you type (zero-shot), using Semantic Diversity Learning (ICCV 2021)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Command modules, registered in this order; a module that is not there yet is skipped.
COMMAND_MODULES = ("tag", "search", "labels", "train", "evaluate", "export", "quantize", "official")


def _version(value: bool) -> None:
    if value:
        print(f"sdltag {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Tag images with seen and zero-shot labels (SDL)."""


for _name in COMMAND_MODULES:
    try:
        _module = importlib.import_module(f"sdltag.commands.{_name}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"sdltag.commands.{_name}":
            raise
        continue
    _module.register(app)


def main() -> None:
    app()
