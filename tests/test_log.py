"""sdltag.log: library records become the CLI's `sdltag: warning: ...` lines on the current stderr."""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Iterator

import pytest
import typer
from typer.testing import CliRunner

from sdltag import log


@pytest.fixture(autouse=True)
def _fresh_logger() -> Iterator[None]:
    """Each test starts without the CLI handler and leaves the logger as it found it."""
    saved = list(log.logger.handlers), log.logger.level
    for handler in list(log.logger.handlers):
        log.logger.removeHandler(handler)
    yield
    for handler in list(log.logger.handlers):
        log.logger.removeHandler(handler)
    for handler in saved[0]:
        log.logger.addHandler(handler)
    log.logger.setLevel(saved[1])


def test_lines_match_the_cli_helpers_and_go_to_the_stderr_of_the_moment(capsys: pytest.CaptureFixture[str]) -> None:
    log.install_cli_handler()
    logging.getLogger("sdltag.index").warning("photos/a.jpg: 100% broken, skipped")  # no %-formatting
    swapped = io.StringIO()
    real, sys.stderr = sys.stderr, swapped
    try:
        logging.getLogger("sdltag").error("cannot write out.csv")
        logging.getLogger("sdltag.tagger").info("12 images tagged")
    finally:
        sys.stderr = real
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "sdltag: warning: photos/a.jpg: 100% broken, skipped\n"
    assert swapped.getvalue() == "sdltag: error: cannot write out.csv\nsdltag: 12 images tagged\n"


def test_quiet_hides_info_only_and_install_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    log.install_cli_handler()
    log.install_cli_handler(quiet=True)
    assert sum(isinstance(h, log.CliHandler) for h in log.logger.handlers) == 1
    logging.getLogger("sdltag.x").info("summary")
    logging.getLogger("sdltag.x").warning("kept")
    logging.getLogger("sdltag.x").critical("worst")
    assert capsys.readouterr().err == "sdltag: warning: kept\nsdltag: error: worst\n"
    log.set_quiet(False)
    logging.getLogger("sdltag.x").info("summary")
    assert capsys.readouterr().err == "sdltag: summary\n"


def test_redirect_sends_lines_to_a_writer_for_a_while(capsys: pytest.CaptureFixture[str]) -> None:
    log.install_cli_handler()
    lines: list[str] = []
    with log.redirect(lines.append):
        logging.getLogger("sdltag").warning("above the bar")
    logging.getLogger("sdltag").warning("after")
    assert lines == ["sdltag: warning: above the bar"]
    assert capsys.readouterr().err == "sdltag: warning: after\n"


def test_records_still_reach_other_handlers(caplog: pytest.LogCaptureFixture) -> None:
    log.install_cli_handler()
    logging.getLogger("sdltag.datasets").warning("x.jpg: no label, skipped")
    assert caplog.messages == ["x.jpg: no label, skipped"]


def test_cli_runner_sees_the_lines_on_its_stderr() -> None:
    """CliRunner swaps sys.stderr per invocation; the handler must follow it, invocation after invocation."""
    app = typer.Typer()

    @app.callback()
    def _root() -> None:
        log.install_cli_handler()

    @app.command()
    def run(name: str) -> None:
        logging.getLogger("sdltag.something").warning(f"{name}: odd")

    runner = CliRunner()
    for name in ("first", "second"):
        result = runner.invoke(app, ["run", name])
        assert result.exit_code == 0, result.output
        assert result.stderr == f"sdltag: warning: {name}: odd\n"
        assert result.stdout == ""


def test_the_real_cli_installs_the_handler() -> None:
    from sdltag.cli import app

    result = CliRunner().invoke(app, ["index", "--help"])
    assert result.exit_code == 0
    assert log.cli_handler() is not None


def test_collect_gathers_warnings_from_any_thread_and_stops_after() -> None:
    import threading

    with log.collect() as messages:
        logging.getLogger("sdltag.index").info("not a warning")
        logging.getLogger("sdltag.index").warning("first")
        worker = threading.Thread(target=lambda: logging.getLogger("sdltag.images").error("second"))
        worker.start()
        worker.join()
    logging.getLogger("sdltag").warning("outside")
    assert messages == ["first", "second"]
