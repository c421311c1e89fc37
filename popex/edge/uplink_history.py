"""The uplink history file: every uplink sample appended to a CSV, for plots of a run.

The in-memory history keeps only the last few samples (for the edge's
status); experiments plot the estimate over a whole run, so every sample
also goes to a file. Writing it can block on a slow or full disk, so
:class:`~popex.edge.uplink.UplinkMonitor` writes outside its lock, from one
thread at a time, and the writer itself takes no lock. A write that fails is
logged, never raised: a full disk must not stop the estimate. The file is
rotated at ``max_bytes`` (to ``<name>.1``, replacing the previous one), so a
long-running edge keeps at most twice that on disk.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterable
from pathlib import Path

from popex.edge.uplink_window import UplinkSample

__all__ = ["DEFAULT_MAX_BYTES", "HISTORY_COLUMNS", "UplinkHistory"]

_log = logging.getLogger(__name__)

#: Default size at which the CSV is rotated (about 300,000 samples).
DEFAULT_MAX_BYTES = 8 * 2**20
#: The CSV's header row.
HISTORY_COLUMNS = ("time_s", "source", "uplink_mbps", "rtt_ms")


def _row(sample: UplinkSample) -> list[str]:
    return [
        f"{sample.time_s:.3f}",
        sample.source,
        "" if sample.uplink_mbps is None else f"{sample.uplink_mbps:.6g}",
        "" if sample.rtt_ms is None else f"{sample.rtt_ms:.6g}",
    ]


class UplinkHistory:
    """Append uplink samples to a CSV file, created with a header on the first write.

    Not thread-safe: its one caller writes from one thread at a time.

    Parameters
    ----------
    path : str or path-like
        The CSV file; its folder is created when missing.
    max_bytes : int
        Size at which the file is moved to ``<path>.1`` and started anew.
    """

    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes

    def write(self, samples: Iterable[UplinkSample]) -> None:
        """Append one row per sample (and the header first if the file is new).

        Parameters
        ----------
        samples : iterable of UplinkSample
            In the order they were measured.
        """
        try:
            if self.path.is_file() and self.path.stat().st_size >= self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            is_new = not self.path.is_file()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", newline="", encoding="utf-8") as handle:
                writer = csv.writer(handle)
                if is_new:
                    writer.writerow(HISTORY_COLUMNS)
                writer.writerows(_row(sample) for sample in samples)
        except OSError as err:  # a full disk must not stop the estimate
            _log.warning("cannot append to %s: %s", self.path, err)
