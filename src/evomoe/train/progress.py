"""A rich progress bar with the numbers a user watches: phase, loss, temperature, experts per token."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.interactive = enabled and self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not self.interactive,
        )
        self.task = self.progress.add_task("train", total=total, completed=start, info="")
        self.total = total
        self.last_printed = -1

    def __enter__(self) -> TrainProgress:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.__exit__(*exc)

    def update(self, step: int, row: dict) -> None:
        tau = row.get("temperature")
        info = (
            f"{row['phase']:<9} loss {row['loss']:.3f}  k {row['experts_per_token']:.2f}"
            + (f"  tau {tau:.2f}" if tau is not None else "")
            + f"  {row['tokens_per_s']:,.0f} tok/s"
        )
        self.progress.update(self.task, completed=step, info=info)
        if self.enabled and not self.interactive:
            # not a terminal (CI, a log file): a plain line about every 10% of the run
            bucket = step * 10 // self.total
            if bucket != self.last_printed:
                self.last_printed = bucket
                print(f"step {step}/{self.total}  {info}", file=sys.stderr, flush=True)

    def note(self, text: str) -> None:
        if self.enabled:
            self.console.print(text) if self.interactive else print(text, file=sys.stderr, flush=True)
