"""What every command line entry point shares: the two consoles, typed errors as one stderr
line plus their exit code, a progress bar that shows only on a terminal, and quiet
transformers logging."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

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
    """A transient rich progress bar on stderr when `enabled`; silent otherwise. It counts
    videos, advances per window as the engine reports them, shows the stage (judging,
    explaining) with a spinner, and steps aside while results are printed.

        with ProgressBar(enabled) as bar:
            bar.start(total, "judging")
            verdicts = engine.check_batch(videos, progress=bar.tracker(len(videos)))
            with bar.aside():
                out.print(...)
    """

    def __init__(self, enabled: bool):
        self.enabled, self.bar, self.task = enabled, None, None
        self.description, self.completed = "", 0.0

    def __enter__(self) -> ProgressBar:
        return self

    def start(self, total: int, description: str = "judging") -> None:
        if self.enabled and total:
            from rich.progress import (
                BarColumn,
                Progress,
                SpinnerColumn,
                TaskProgressColumn,
                TextColumn,
                TimeRemainingColumn,
            )

            self.description = description
            self.bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                TaskProgressColumn(), TimeRemainingColumn(), console=err,
                                transient=True)
            self.bar.start()
            self.task = self.bar.add_task(description, total=total)

    def step(self, n: float = 1.0) -> None:
        """`n` more videos done."""
        self.completed += n
        if self.bar is not None:
            self.bar.update(self.task, completed=self.completed, description=self.description)

    def tracker(self, videos: int) -> Callable[[str, int, int], None]:
        """The engine's `progress` callback for one call judging `videos` videos: the bar
        moves by windows done / windows in the call, and shows the stage while explaining.
        Call `step(videos)` when the call returns."""
        start = self.completed

        def update(stage: str, done: int, total: int) -> None:
            if self.bar is None or not total:
                return
            if stage == "judging":
                self.bar.update(self.task, completed=start + videos * done / total,
                                description=self.description)
            else:                        # a stage change is drawn at once
                self.bar.update(self.task, description=f"{stage} {done}/{total}")
                self.bar.refresh()
        return update

    @contextmanager
    def aside(self) -> Iterator[None]:
        """Print inside this block: the live bar is cleared first and drawn again after, so
        output never lands on the bar's line (stdout stays stdout)."""
        if self.bar is None:
            yield
            return
        self.bar.stop()
        try:
            yield
        finally:
            out.file.flush()
            self.bar.start()

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def quiet_transformers() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


# --engine and --vllm-option, shared by check, policy test and bench run
Engine_ = Annotated[str, typer.Option(
    "--engine", help="transformers (our runner: every layout, pruning) | vllm (vLLM in "
    "process: layouts sequential and isolated; needs vLLM installed)")]
VllmOption_ = Annotated[list[str] | None, typer.Option(
    "--vllm-option", help="A vLLM engine setting KEY=VALUE (VALUE read as JSON where it "
    "parses, e.g. tensor_parallel_size=2, gpu_memory_utilization=0.85); repeatable.")]


def vllm_settings(pairs: list[str] | None) -> dict | None:
    """--vllm-option KEY=VALUE pairs -> settings for vllm.LLM (None when none given)."""
    import json

    from guardrail.errors import UsageError

    if not pairs:
        return None
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--vllm-option {pair!r}: expected KEY=VALUE")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# --sampling and its settings, shared by check, video probe, bench run and policy test
Sampling_ = Annotated[str, typer.Option(
    "--sampling", help="How frames are chosen, by presentation time: uniform (--frames per "
    "window) | fps (--fps per second, at most --max-frames per window) | coverage (a pass over "
    "every frame finds the shots; every shot of --min-shot s or more and no gap over --max-gap "
    "s, at most --max-frames per video, in windows of --frames)")]
MaxFrames_ = Annotated[int | None, typer.Option(
    "--max-frames", help="fps: frames per window (default 32); coverage: frames per video "
    "(default 256; past it the verdict warns that coverage was cut).")]
MinShot_ = Annotated[float, typer.Option("--min-shot", help="coverage: shortest shot that "
                                         "must get a judged frame, seconds.")]
MaxGap_ = Annotated[float, typer.Option("--max-gap", help="coverage: longest time between "
                                        "judged frames, seconds.")]
SampleFps_ = Annotated[float, typer.Option("--fps", help="fps sampling: frames per second.")]
