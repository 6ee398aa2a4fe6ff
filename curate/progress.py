"""Progress of a segment in the log: parts done, rows, rows/s and an ETA.

Example: progress = Progress("segment 1/3 [judge]", total=10); progress.tick(500)
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

log = logging.getLogger("curate.runner")


def clock(seconds: float) -> str:
    """H:MM:SS. Example: clock(3725) -> '1:02:05'"""
    seconds = int(round(seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


@dataclass
class Progress:
    """Logs parts done, rows/s and an ETA for one segment. Example: Progress("dedup", 10).tick(500)"""

    label: str
    total: int
    done: int = 0
    rows: int = 0
    started: float = field(default_factory=time.perf_counter)
    last_log: float = 0.0

    def tick(self, rows: int) -> None:
        self.done += 1
        self.rows += rows
        now = time.perf_counter()
        if self.done < self.total and now - self.last_log < 1.0:
            return
        self.last_log = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        log.info("%s: part %d/%d, %d rows, %.3g rows/s, ETA %s", self.label, self.done, self.total, self.rows,
                 self.rows / elapsed if elapsed > 0 else 0.0, clock(eta))
