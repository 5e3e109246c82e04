"""The sdltag command line: thin Typer commands over the library.

Each command group lives in ``sdltag/commands/<name>.py`` and registers itself here.
"""

from __future__ import annotations

from sdltag._platform import single_thread_blas, tune_openblas

tune_openblas()  # both must run before anything imports numpy
single_thread_blas()

import importlib  # noqa: E402

import typer  # noqa: E402
import typer.core  # noqa: E402

from sdltag import __version__  # noqa: E402


def _argument_metavar(self: typer.core.TyperArgument, ctx: object, *, usage: bool = False) -> str:
    """Usage lines as other command-line tools write them: ``PATHS...``, ``[PATHS]...``.

    Typer's own rendering wraps required arguments in braces (``{paths}...``).
    """
    var = self.metavar or (self.name or "").upper()
    if self.nargs != 1 and not var.endswith("..."):
        var += "..."
    if usage and not self.required and not var.startswith("["):
        var = f"[{var}]"
    return var


# mypy refuses assigning to a method; replacing this one of Typer's is the point.
typer.core.TyperArgument.make_metavar = _argument_metavar  # type: ignore[method-assign]

app = typer.Typer(
    name="sdltag",
    help=(
        "Tag folders of images with the labels an SDL model was trained on and with any labels "
        "you type (zero-shot), using Semantic Diversity Learning (ICCV 2021)."
    ),
    no_args_is_help=True,
    # `sdltag --install-completion` / `--show-completion` (bash, zsh, fish, PowerShell)
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# Command modules, registered in this order.
COMMAND_MODULES = ("tag", "search", "index", "labels", "train", "evaluate", "export", "quantize", "official")


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
    from sdltag.log import install_cli_handler

    install_cli_handler()  # library warnings become `sdltag: warning: ...` lines on stderr


for _name in COMMAND_MODULES:
    importlib.import_module(f"sdltag.commands.{_name}").register(app)


def main() -> None:
    app()
