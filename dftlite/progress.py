"""Progress of long loops that a user waits on: counts, a rate and an ETA, moving every few seconds.

On a terminal it is a rich bar redrawn in place. In a log file (stderr not a terminal) carriage
returns would pile up or vanish, so it writes one plain line every `log_every` seconds instead,
and a last line at the end:

    generating: 1,536/6,144 tokens (25%), 41.3 tokens/s, elapsed 0:00:37, ETA 0:01:52

    with Progress("generating", total=len(prompts) * max_new_tokens, unit="tokens") as progress:
        model.generate(..., streamer=StepStreamer(progress))   # one token per row at each decoding step

Not for the Trainer: transformers prints its own per-step bar.
"""

from __future__ import annotations

import datetime
import time

LOG_EVERY_SECONDS = 30.0  # a log file gets a line this often: enough to see it move, few enough to read


def _clock(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(seconds)))


class Progress:
    """A counter towards `total` `unit`s with rate and ETA; a context manager."""

    def __init__(self, description: str, total: int, unit: str = "items", console=None, log_every: float = LOG_EVERY_SECONDS):
        from rich.console import Console

        # stderr, so that `--json` output on stdout stays parseable
        self.console = console if console is not None else Console(stderr=True)
        self.description, self.total, self.unit, self.log_every = description, total, unit, log_every
        self.completed, self.started, self.last_line = 0, None, None
        self.status = ""  # a short note after the counts, e.g. "3/20 prompts"; set it before advance()
        self._bar = self._task = None

    def __enter__(self):
        self.started = self.last_line = time.perf_counter()
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn(self.description), BarColumn(), MofNCompleteColumn(), TextColumn(self.unit),
                            TextColumn("{task.fields[status]}"), TextColumn("{task.fields[rate]:.1f} {task.fields[unit]}/s"),
                            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=self.console, transient=True)
            self._bar.__enter__()
            self._task = self._bar.add_task(self.description, total=self.total, rate=0.0, unit=self.unit, status=self.status)
        return self

    def advance(self, amount: int = 1):
        self.completed += amount
        now = time.perf_counter()
        if self._bar is not None:
            self._bar.update(self._task, advance=amount, rate=self.completed / max(now - self.started, 1e-9), status=self.status)
        elif now - self.last_line >= self.log_every:
            self.last_line = now
            self.console.print(self.line(now), highlight=False, soft_wrap=True)

    def line(self, now: float | None = None) -> str:
        """One plain progress line, as a log file gets it."""
        elapsed = (time.perf_counter() if now is None else now) - self.started
        rate = self.completed / max(elapsed, 1e-9)
        share = f" ({self.completed / self.total:.0%})" if self.total else ""
        eta = _clock((self.total - self.completed) / rate) if rate > 0 and self.total else "?"
        status = f", {self.status}" if self.status else ""
        return (f"{self.description}: {self.completed:,}/{self.total:,} {self.unit}{share}{status}, {rate:.1f} {self.unit}/s, "
                f"elapsed {_clock(elapsed)}, ETA {eta}")

    def __exit__(self, *exc):
        if self._bar is not None:
            self._bar.__exit__(*exc)
        elif exc[0] is None:
            self.console.print(self.line(), highlight=False, soft_wrap=True)
        return False


class StepStreamer:
    """A `generate` streamer that advances a Progress by one token per row at every decoding step.

    transformers calls put() with the prompt ids first (skipped), then with each step's new tokens (B,).
    `steps` counts the decoding steps, so a caller can add a batch's unused budget when it ends early."""

    def __init__(self, progress: Progress):
        self.progress, self.prompt_seen, self.steps = progress, False, 0

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.steps += 1
        self.progress.advance(value.shape[0])

    def end(self):
        pass
