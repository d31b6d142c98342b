"""Keras-style progress lines.

On a terminal the line is redrawn in place::

    938/938 ━━━━━━━━━━━━━━━━━━━━ 3s 3ms/step - accuracy: 0.9512 - loss: 0.1573

When output goes to a file or a CI log there are no carriage returns: one line per epoch.
``verbose=2`` prints one line per epoch, ``938/938 - 3s - 3ms/step - accuracy: ... - loss: ...``;
``verbose=0`` prints nothing.
"""
import sys
import time

import numpy as np

BAR_WIDTH = 20


def format_duration(seconds):
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    if seconds >= 60:
        return f"{seconds // 60}:{seconds % 60:02d}"
    return f"{seconds}s"


def format_per_step(seconds):
    if seconds >= 1:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


def format_metrics(metrics, added=()):
    """" - name: value" for each metric in name order, then the ``added`` names (what callbacks logged at the end of
    an epoch, such as learning_rate: last, as Keras prints them); numbers to 4 decimals."""
    names = sorted(k for k in metrics if k not in added) + [k for k in added if k in metrics]
    return "".join(f" - {k}: {_shown(metrics[k])}" for k in names)


def _shown(value):
    """A logged value as the progress line shows it: one number (a float, a NumPy scalar or 0-d array, an optimizer's
    learning_rate) to 4 decimals, anything else as it prints."""
    if not isinstance(value, (str, bytes)):
        try:
            if np.ndim(value) == 0:
                return f"{float(value):.4f}"
        except (TypeError, ValueError):  # (a ragged list has no ndim)
            pass
    return str(value)


class Progbar:
    """Progress over ``target`` steps; ``update(step, metrics)`` and ``finish(metrics)``."""

    def __init__(self, target, verbose=1, stream=None, interval=0.05):
        self.target, self.verbose = target, verbose
        self.stream = stream or sys.stdout
        self.dynamic = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval
        self.start = time.perf_counter()
        self.first_step_done = None  # the first step (compilation, warm-up) is left out of per-step time
        self.last_draw = 0.0
        self.width = 0
        self.seen = 0  # the last step reported

    def _per_step(self, step, now):
        if self.first_step_done is None or step <= 1:
            return (now - self.start) / max(step, 1)
        return (now - self.first_step_done[1]) / (step - self.first_step_done[0])

    def _bar(self, step):
        if self.target is None:  # a dataset of unknown length: Keras's "12/Unknown"
            return f"{step}/Unknown"
        digits = len(str(self.target))
        done = int(BAR_WIDTH * step / self.target) if self.target else BAR_WIDTH
        if self.dynamic:
            bar = "\x1b[32m" + "━" * done + "\x1b[0m" + "\x1b[37m" + "━" * (BAR_WIDTH - done) + "\x1b[0m"
        else:
            bar = "━" * BAR_WIDTH if done == BAR_WIDTH else "━" * done + " " * (BAR_WIDTH - done)
        return f"{step:{digits}d}/{self.target} {bar}"

    def update(self, step, metrics):
        """Redraw (terminal, verbose=1 only) after ``step`` steps, at most every ``interval`` s."""
        now = time.perf_counter()
        self.seen = step
        if self.first_step_done is None and step >= 1:
            self.first_step_done = (step, now)
        if self.verbose != 1 or not self.dynamic or (self.target is not None and step >= self.target):
            return
        if now - self.last_draw < self.interval:
            return
        self.last_draw = now
        per_step = self._per_step(step, now)
        eta = "" if self.target is None else f" {format_duration(per_step * (self.target - step))}"
        self._write("\r" + self._bar(step) + f"{eta} {format_per_step(per_step)}" + format_metrics(metrics), end="")

    def finish(self, metrics, added=()):
        """The epoch's final line (the only one when not on a terminal); ``added``: format_metrics's."""
        if self.verbose == 0:
            return
        steps = self.seen if self.target is None else self.target  # (an unknown length: the steps that ran)
        now = time.perf_counter()
        elapsed, per_step = now - self.start, self._per_step(steps, now)
        if self.verbose == 2:
            line = (f"{steps}/{self.target or 'Unknown'} - {format_duration(elapsed)} - "
                    f"{format_per_step(per_step)}{format_metrics(metrics, added)}")
        else:
            line = (self._bar(steps) + f" {format_duration(elapsed)} {format_per_step(per_step)}"
                    + format_metrics(metrics, added))
        self._write(("\r" if self.dynamic else "") + line, end="\n")

    def _write(self, text, end):
        pad = ""
        if self.dynamic and text.startswith("\r"):
            pad = " " * max(self.width - len(text), 0)
            self.width = len(text)
        self.stream.write(text + pad + end)
        self.stream.flush()
