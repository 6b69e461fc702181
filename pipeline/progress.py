"""Progress reporting: a tqdm bar on a terminal, quiet periodic log lines otherwise.

Snakemake captures stderr into log files, where a redrawn bar is noise; there we log one
line every ``interval`` seconds with the rate.
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("lenspipe.progress")


class Progress:
    def __init__(
        self,
        total: int,
        desc: str,
        unit: str = "tok",
        interval: float = 15.0,
        initial: int = 0,
        force_bar: bool | None = None,
    ):
        self.total, self.desc, self.unit, self.interval = total, desc, unit, interval
        self.n = self._start_n = initial
        self._t0 = self._last = time.monotonic()
        use_bar = sys.stderr.isatty() if force_bar is None else force_bar
        self._bar = None
        if use_bar:
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True)

    @property
    def rate(self) -> float:
        """Items per second since this process started (resumed work excluded)."""
        return (self.n - self._start_n) / max(time.monotonic() - self._t0, 1e-9)

    def update(self, n: int, **postfix) -> None:
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            return
        now = time.monotonic()
        if now - self._last >= self.interval or self.n >= self.total:
            self._last = now
            extra = " ".join(f"{k}={v}" for k, v in postfix.items())
            rate = self.rate
            rate_s = f"{rate:.0f} {self.unit}/s" if rate >= 10 else f"{1 / rate:.1f} s/{self.unit}" if rate > 0 else "-"
            log.info("%s: %d/%d %s (%s) %s", self.desc, self.n, self.total, self.unit, rate_s, extra)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
