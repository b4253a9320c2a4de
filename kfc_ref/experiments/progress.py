"""Progress of a training run on stderr, readable in a terminal and in a log file.

* stderr is a terminal: a tqdm bar with iterations, elapsed time, ETA, the last mini-batch
  loss, the last test error and the *training-only* examples/s (evaluation time excluded);
* stderr is not a terminal (a log file, CI): one plain line every :data:`LOG_PERCENT` percent
  of the run and at every evaluation, no ``\\r`` frames;
* ``quiet``: nothing.
"""
from __future__ import annotations

import sys
import time

#: A plain progress line at least every this many percent of the run (non-terminal output).
LOG_PERCENT = 5
#: The terminal bar's statistics are refreshed at most this often (seconds).
REFRESH_SECONDS = 0.5


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    return (f"{h}:" if h else "") + f"{rest // 60:02d}:{rest % 60:02d}"


class Progress:
    """``update(k, examples, train_seconds, loss, test_error)`` after every iteration;
    ``loss`` may be a callable returning the loss (read only when shown: no needless host
    sync on a GPU)."""

    def __init__(self, total: int, start: int, quiet: bool, stream=None):
        self.total, self.start = total, start
        self.stream = sys.stderr if stream is None else stream
        self.mode = "quiet" if quiet else ("bar" if _is_terminal(self.stream) else "lines")
        self.t0 = time.perf_counter()
        self.last_refresh = 0.0
        self.next_line = start
        self.bar = None
        if self.mode == "bar":
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, file=self.stream, dynamic_ncols=True,
                            unit="it", bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} "
                                                  "[{elapsed}<{remaining}{postfix}]")

    def wants_loss(self, k: int, force: bool = False) -> bool:
        """Whether :meth:`update` at iteration ``k`` will show the loss."""
        if self.mode == "quiet":
            return False
        if force:
            return True
        if self.mode == "bar":
            return time.perf_counter() - self.last_refresh >= REFRESH_SECONDS
        return k >= self.next_line

    def update(self, k: int, examples: int, train_seconds: float, loss, test_error=None,
               force: bool = False):
        show = self.wants_loss(k, force)
        if self.bar is not None:
            self.bar.update(k - self.bar.n)
        if not show:
            return
        loss = loss() if callable(loss) else loss
        rate = examples / max(train_seconds, 1e-9)
        err = "" if test_error is None else f", test err {test_error:.4f}"
        self.last_refresh = time.perf_counter()
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f}{err}, {rate:,.0f} train ex/s")
            return
        elapsed = time.perf_counter() - self.t0
        done = max(k - self.start, 1e-9)
        eta = elapsed / done * (self.total - k)
        self.stream.write(f"iteration {k}/{self.total} ({100 * k / self.total:.0f}%) elapsed "
                          f"{_clock(elapsed)} ETA {_clock(eta)} loss {loss:.4f}{err} "
                          f"{rate:,.0f} train ex/s\n")
        self.stream.flush()
        step = max(1, self.total * LOG_PERCENT // 100)
        self.next_line = (k // step + 1) * step

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _is_terminal(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
