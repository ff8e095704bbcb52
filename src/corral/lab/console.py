"""Terminal output for the lab: tables and live progress, with rich when it is installed.

rich draws live progress bars and boxed tables; without it (the lab extra not
installed, or output redirected to a file) the same information is printed as
plain aligned text, a line per finished task, so logs stay readable.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

__all__ = ["Board", "Display"]


def _rich_console(stream: TextIO) -> Any:
    """A rich Console writing to ``stream``, or ``None`` without rich."""
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(file=stream, highlight=False)


class Board:
    """Live progress of a few tasks; one line each."""

    def __init__(self, display: Display, progress: Any) -> None:
        self._display = display
        self._progress = progress
        self._totals: dict[int, tuple[str, int | None]] = {}

    def add(self, description: str, total: int | None) -> int:
        """Start showing a task; returns its id."""
        if self._progress is not None:
            task_id: int = self._progress.add_task(description, total=total, note="")
        else:
            task_id = len(self._totals)
        self._totals[task_id] = (description, total)
        return task_id

    def update(self, task_id: int, completed: int, note: str = "") -> None:
        """The task's count so far, and a short note (failures, a rate)."""
        if self._progress is not None:
            self._progress.update(task_id, completed=completed, note=note)

    def finish(self, task_id: int, note: str) -> None:
        """Mark the task done with a final note."""
        description, total = self._totals[task_id]
        if self._progress is not None:
            if total is not None:
                self._progress.update(task_id, completed=total, note=note)
            else:
                self._progress.update(task_id, total=1, completed=1, note=note)
        else:
            self._display.print(f"  {description}: {note}")


class Display:
    """Where the lab's commands write: rich when available and wanted, else plain text."""

    def __init__(self, stream: TextIO | None = None, *, use_rich: bool | None = None) -> None:
        self.stream = stream if stream is not None else sys.stdout
        self._console: Any = None
        if use_rich is not False:
            console = _rich_console(self.stream)
            # A file or a pipe gets plain text unless rich was asked for.
            if console is not None and (use_rich or console.is_terminal):
                self._console = console

    @property
    def rich(self) -> bool:
        return self._console is not None

    def print(self, text: str = "") -> None:
        """A paragraph of plain text (no markup interpreted)."""
        if self._console is not None:
            self._console.print(text, markup=False, soft_wrap=False)
        else:
            print(text, file=self.stream, flush=True)

    def table(
        self,
        title: str,
        columns: list[str],
        rows: list[list[str]],
        *,
        right: set[int] | None = None,
        styles: list[str] | None = None,
    ) -> None:
        """A table; ``right`` holds the indexes of right-aligned columns (numbers)."""
        right = right or set()
        if self._console is not None:
            from rich.table import Table

            table = Table(title=title, title_justify="left", header_style="bold")
            for index, column in enumerate(columns):
                table.add_column(column, justify="right" if index in right else "left")
            for index, row in enumerate(rows):
                style = styles[index] if styles else None
                table.add_row(*row, style=style or None)
            self._console.print(table)
            return
        widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(columns)]

        def line(cells: list[str]) -> str:
            return "  ".join(
                cell.rjust(w) if i in right else cell.ljust(w)
                for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        self.print(title)
        self.print(line(columns))
        self.print(line(["-" * w for w in widths]))
        for row in rows:
            self.print(line(row))

    @contextmanager
    def board(self) -> Iterator[Board]:
        """Live progress for the body of a ``with``; plain lines when rich is off."""
        if self._console is None:
            yield Board(self, None)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(bar_width=30),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[note]}"),
            console=self._console,
            refresh_per_second=8,
        )
        with progress:
            yield Board(self, progress)
