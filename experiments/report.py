"""Writing experiment results: CSV files, PNG figures, and a section of ``docs/results.md``.

Every experiment writes into ``<out_root>/<name>/`` and replaces only its
own ``## <name>`` section of the results document (other sections, e.g.
``## Distortion``, are kept as they are). It also says under what load it
ran: on a shared machine a latency means little without it.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from popex.testbed.services import REPO_ROOT

__all__ = [
    "DEFAULT_OUT_ROOT",
    "DEFAULT_DOCS_PATH",
    "RunInfo",
    "LoadSample",
    "load_sample",
    "write_csv",
    "read_csv",
    "replace_docs_section",
    "pyplot",
    "markdown_table",
    "relative",
    "publish_figure",
]

DEFAULT_OUT_ROOT = REPO_ROOT / "results"
DEFAULT_DOCS_PATH = REPO_ROOT / "docs" / "results.md"
_DOCS_TITLE = "# POPEX results\n\nOne section per experiment; each is rewritten by its own command.\n"


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return ";".join("off" if v is None else str(v) for v in value)
    return value


@dataclass(frozen=True)
class LoadSample:
    """The machine's load at one moment (``os.getloadavg``), for the record."""

    time_s: float
    load_1min: float
    n_cpus: int

    def text(self) -> str:
        """``"load 3.9 on 2 CPUs at 08:12 UTC"``."""
        stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(self.time_s))
        return f"load average {self.load_1min:.1f} on {self.n_cpus} CPUs at {stamp}"


@dataclass(frozen=True)
class RunInfo:
    """How one experiment run went: for its docs section and the caller.

    Attributes
    ----------
    name : str
    quick : bool
    run_time_s : float
        Wall time of the whole run, s.
    mode : str
        "netns", "emulation" or "offline" (no services).
    link_note : str
    load_before, load_after : LoadSample
    files : tuple of Path
        CSV and PNG files written.
    """

    name: str
    quick: bool
    run_time_s: float
    mode: str
    link_note: str
    load_before: LoadSample
    load_after: LoadSample
    files: tuple[Path, ...]

    def text(self) -> str:
        """One paragraph: command, run time, link, load."""
        command = f"popex experiment {self.name}" + (" --quick" if self.quick else "")
        return (f"`{command}` ran in {self.run_time_s:.0f} s; link: {self.mode}"
                + (f" ({self.link_note})" if self.link_note else "")
                + f". Load: {self.load_before.text()} before, {self.load_after.load_1min:.1f} after. "
                f"CSV and PNG: `results/{self.name}/`.")


def load_sample() -> LoadSample:
    """The 1-minute load average and CPU count now."""
    return LoadSample(time_s=time.time(), load_1min=float(os.getloadavg()[0]), n_cpus=int(os.cpu_count() or 1))


def write_csv(path: Path, rows: Sequence[Any]) -> Path:
    """Write dataclasses or mappings (one per row) as CSV; returns ``path``.

    The columns are every key met, in first-seen order; a row without a key
    leaves its cell empty.

    Floats are written with ``repr`` (no precision lost); tuples and lists
    as ``;``-joined values with None as ``off``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    dicts = [dataclasses.asdict(row) if dataclasses.is_dataclass(row) else dict(row) for row in rows]
    fieldnames = list(dict.fromkeys(key for row in dicts for key in row))  # every key, in first-seen order
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames, restval="")
        writer.writeheader()
        for row in dicts:
            writer.writerow({key: _plain(value) for key, value in row.items()})
    return path


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a CSV file as dicts of strings."""
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def replace_docs_section(path: Path, heading: str, body: str) -> Path:
    """Replace the section that starts with the line ``heading`` (up to the next ``## `` or the end).

    The file is created (with a title) if absent; a missing section is
    appended. Other sections are left byte for byte as they are.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.is_file() else _DOCS_TITLE
    section = f"{heading}\n\n{body.strip()}\n\n"
    pattern = re.compile(rf"^{re.escape(heading)}[ \t]*\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text.rstrip("\n") + "\n", encoding="utf-8")
    return path


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table.

    Examples
    --------
    >>> print(markdown_table(["a", "b"], [[1, "x"]]))
    | a | b |
    |---|---|
    | 1 | x |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def relative(path: Path, start: Path) -> str:
    """``path`` relative to ``start`` when possible (for links in the docs), else absolute."""
    try:
        return os.path.relpath(path, start)
    except ValueError:
        return str(path)


def publish_figure(png: Path, docs_path: Path) -> Path:
    """Copy a figure next to the results document (``<docs>/img/<name>``), where the repository keeps it.

    ``results/`` is not versioned; the copy is what the document links to.
    """
    target = Path(docs_path).parent / "img" / Path(png).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(png, target)
    return target
