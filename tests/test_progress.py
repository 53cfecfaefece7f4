"""Progress: a plain line per interval in a log file, a bar on a terminal (progress.py)."""

from __future__ import annotations

import io
import re

from rich.console import Console

from dftlite.progress import Progress


def test_log_file_gets_plain_lines_with_rate_and_eta():
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    with Progress("generating", total=10, unit="tokens", console=console, log_every=0.0) as progress:
        progress.advance(2)
        progress.advance(3)
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    # one line per advance (log_every 0), then the closing line
    assert [re.match(r"generating: (\d+)/10 tokens \((\d+)%\)", line).groups() for line in lines] == [
        ("2", "20"), ("5", "50"), ("5", "50")]
    assert all(re.search(r", [\d.]+ tokens/s, elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|\?)$", line) for line in lines)


def test_log_file_lines_are_spaced_by_the_interval():
    log = io.StringIO()
    console = Console(file=log, force_terminal=False, width=200)
    with Progress("scoring", total=1000, unit="sequences", console=console, log_every=3600.0) as progress:
        for _ in range(1000):
            progress.advance()
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scoring: 1,000/1,000 sequences (100%)")  # only the closing line


def test_terminal_draws_a_bar_not_lines():
    screen = io.StringIO()
    console = Console(file=screen, force_terminal=True, width=120)
    with Progress("generating", total=4, unit="tokens", console=console, log_every=0.0) as progress:
        progress.advance(4)
    assert progress.completed == 4
    assert "generating: " not in screen.getvalue()  # the log-line form is for files only
