"""The progress bar helper: shown on a terminal only, silent otherwise, fields and rate rendered."""

from __future__ import annotations

import io

from rich.console import Console

from sdltag.progress import ProgressBar


def _terminal() -> tuple[Console, io.StringIO]:
    buffer = io.StringIO()
    return Console(file=buffer, force_terminal=True, width=120), buffer


def test_no_bar_when_stderr_is_not_a_terminal(capsys) -> None:
    bar = ProgressBar("tagging", total=3, rate_unit="img/s")
    assert not bar.active  # pytest's captured stderr is no terminal
    with bar:
        bar.advance(2)
        bar.update(completed=3)
        assert not bar.shown
        bar.print("sdltag: a message")
    assert capsys.readouterr().err == "sdltag: a message\n"


def test_quiet_hides_the_bar_even_on_a_terminal() -> None:
    console, buffer = _terminal()
    with ProgressBar("tagging", total=3, quiet=True, console=console) as bar:
        bar.advance()
        assert not bar.shown
    assert buffer.getvalue() == ""


def test_bar_on_a_terminal_shows_label_count_fields_and_lines_above() -> None:
    console, buffer = _terminal()
    bar = ProgressBar(
        "epoch {task.fields[epoch]}",
        total=10,
        fields="loss {task.fields[loss]}",
        transient=False,
        console=console,
        epoch=1,
        loss="-",
    )
    with bar:
        assert bar.shown
        bar.update(completed=4, epoch=2, loss="0.5000")
        bar.print("sdltag: epoch 1 done")
    out = buffer.getvalue()
    assert "sdltag: epoch 1 done" in out
    assert "epoch 2" in out and "4/10" in out and "loss 0.5000" in out
    assert not bar.shown


def test_transient_bar_draws_while_running_and_stops_twice_harmlessly() -> None:
    console, buffer = _terminal()
    bar = ProgressBar("tagging", total=5, rate_unit="img/s", console=console)
    bar.start()
    bar.advance(5)
    bar.stop()
    bar.stop()  # a second stop is harmless
    assert not bar.shown
    assert "tagging" in buffer.getvalue()  # drawn while running; erased (transient) at the end
