"""One concise progress display for scoring commands, fed by ``score()``'s ``on_block`` callback.

On a terminal: a tqdm bar (images, rate, errors). Elsewhere (CI, ``ray job`` logs, ``| tee``):
one short line every ``interval_s`` seconds, or every ``every`` images when given, so a job log
shows that work goes on without Ray Data's hundreds of INFO lines. The command prints the
final summary itself. No image names are shown: they may carry patient identifiers.

>>> with Progress("scoring") as progress:  # doctest: +SKIP
...     result = score(source, art, out, settings, on_block=progress)
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import pyarrow as pa
import pyarrow.compute as pc

from cxr_ray.vocabulary import Status


class Progress:
    """Counts rows (and error rows) of each committed block; see the module docstring."""

    def __init__(
        self,
        what: str = "scoring",
        *,
        stream: IO[str] | None = None,
        interval_s: float = 10.0,
        every: int | None = None,
        tty: bool | None = None,
    ) -> None:
        self.what = what
        self.stream = stream if stream is not None else sys.stderr
        self.interval_s = interval_s
        self.every = every
        self.tty = self.stream.isatty() if tty is None else tty
        self.images = 0
        self.errors = 0
        self.lines = 0
        self._started = time.monotonic()
        self._last_at = self._started
        self._last_images = 0
        self._bar: Any = None

    def __enter__(self) -> Progress:
        if self.tty:
            from tqdm import tqdm

            self._bar = tqdm(desc=self.what, unit="img", file=self.stream, dynamic_ncols=True, leave=False)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __call__(self, table: pa.Table) -> None:
        """The ``on_block`` callback: one committed predictions block."""
        n = table.num_rows
        errors = 0
        if "status" in table.column_names and n:
            errors = int(pc.sum(pc.equal(table["status"], Status.ERROR)).as_py() or 0)
        self.images += n
        self.errors += errors
        if self._bar is not None:
            self._bar.update(n)
            self._bar.set_postfix(errors=self.errors, refresh=False)
            return
        now = time.monotonic()
        due_by_count = self.every is not None and self.images - self._last_images >= self.every
        if due_by_count or now - self._last_at >= self.interval_s:
            self._line(now)

    def _line(self, now: float) -> None:
        elapsed = now - self._started
        rate = self.images / elapsed if elapsed > 0 else 0.0
        self.stream.write(
            f"{self.what}: {self.images} images ({self.errors} errors), {rate:.1f} img/s, {elapsed:.0f} s\n"
        )
        self.stream.flush()
        self.lines += 1
        self._last_at, self._last_images = now, self.images

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
