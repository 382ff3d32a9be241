"""What every command line entry point shares: the two consoles, typed errors as one stderr
line plus their exit code, a progress bar that shows only on a terminal, and quiet
transformers logging."""

from __future__ import annotations

import functools
import os

import typer
from rich.console import Console

from guardrail.errors import GuardrailError

# soft_wrap: lines are never rewrapped at the terminal width (piped output is 80 columns)
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)


def fail(error: GuardrailError, where: str | None = None) -> typer.Exit:
    """Print `error` (each of its messages) as `where: message` lines; the Exit to raise."""
    prefix = f"{where}: " if where else ""
    for line in getattr(error, "messages", None) or [str(error)]:
        err.print(f"{prefix}{line}", markup=False, soft_wrap=True)
    return typer.Exit(error.exit_code)


def guarded(fn):
    """Map guardrail's typed errors to one stderr line and the error's exit code."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except GuardrailError as error:
            raise fail(error) from None
    return wrapper


class ProgressBar:
    """A transient rich progress bar on stderr when `enabled`; silent otherwise.

        with ProgressBar(enabled) as bar:
            bar.start(total, "judging")
            ... bar.step()
    """

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None

    def __enter__(self) -> ProgressBar:
        return self

    def start(self, total: int, description: str = "judging") -> None:
        if self.enabled and total:
            from rich.progress import Progress

            self.bar = Progress(console=err, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)

    def step(self) -> None:
        if self.bar is not None:
            self.bar.advance(self.task)

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
