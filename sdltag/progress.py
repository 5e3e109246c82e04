"""Progress bars on stderr, one per task: shown on a terminal only, never when quiet.

Every command draws its bar with ``ProgressBar``: a label, the bar, done/total, then an
optional rate (``12.3 img/s``) and free-form fields, then the time left. When the bar
is not shown (``quiet``, or stderr is a file or a pipe) every method does nothing, so
callers need no branches. Rich is imported only when a bar is shown.
"""

from __future__ import annotations

import sys
from typing import Any


class ProgressBar:
    """A Rich progress bar for one task on stderr (or on ``console``).

    ``label`` and ``fields`` are Rich column templates: ``"epoch {task.fields[epoch]}"`` shows
    the value given as ``epoch=`` to the constructor or to ``update``. ``rate_unit`` adds the
    task's measured speed (``"img/s"``); ``eta_label`` a word before the time left. The bar
    is shown when not ``quiet`` and the console (default: stderr) is a terminal.
    """

    def __init__(
        self,
        label: str,
        total: float | None = None,
        *,
        completed: float = 0,
        rate_unit: str | None = None,
        fields: str = "",
        eta_label: str = "",
        transient: bool = True,
        quiet: bool = False,
        console: Any = None,
        **values: Any,
    ) -> None:
        self.label, self.total, self.completed = label, total, completed
        self.rate_unit, self.fields, self.eta_label = rate_unit, fields, eta_label
        self.transient, self.values = transient, values
        self._console = console
        terminal = console.is_terminal if console is not None else sys.stderr.isatty()
        self.active = not quiet and bool(terminal)
        self._progress: Any = None
        self._task: Any = None

    def _columns(self) -> list[Any]:
        from rich.progress import BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeRemainingColumn
        from rich.text import Text

        unit = self.rate_unit

        class RateColumn(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(f"{task.speed:.1f} {unit}" if task.speed else "")

        columns: list[Any] = [TextColumn(self.label), BarColumn(), MofNCompleteColumn()]
        if unit:
            columns.append(RateColumn())
        if self.fields:
            columns.append(TextColumn(self.fields))
        if self.eta_label:
            columns.append(TextColumn(self.eta_label))
        columns.append(TimeRemainingColumn())
        return columns

    def start(self) -> ProgressBar:
        """Show the bar (nothing when not ``active``, or already shown)."""
        if not self.active or self._progress is not None:
            return self
        from rich.console import Console
        from rich.progress import Progress

        console = self._console if self._console is not None else Console(file=sys.stderr)
        self._progress = Progress(*self._columns(), console=console, transient=self.transient)
        self._progress.start()
        self._task = self._progress.add_task("", total=self.total, completed=self.completed, **self.values)
        return self

    def stop(self) -> None:
        """Take the bar down (a transient bar leaves nothing behind)."""
        if self._progress is not None:
            self._progress.stop()
            self._progress = None

    def __enter__(self) -> ProgressBar:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def shown(self) -> bool:
        """Whether the bar is on the screen now."""
        return self._progress is not None

    def advance(self, count: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, count)

    def update(self, *, completed: float | None = None, total: float | None = None, **values: Any) -> None:
        """New position, total or field values (``update(loss="0.12")``)."""
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, total=total, **values)

    def print(self, text: str) -> None:
        """A line above the bar (or a plain stderr line when no bar is shown)."""
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, file=sys.stderr, flush=True)
