"""Issue 24, defect 6: reading a Parquet source costs memory bounded by the block, not the row group.

A 150 MB table of 1500 random 100 kB "images" in ONE row group is read by the real reader
(``sources.list_source`` + ``readers.read_unit``) in a fresh subprocess, which reports the
Arrow memory pool's peak and its RSS growth for the first ``rows_per_block`` block. The
same probe reading the row group whole (``read_row_group``, the reader before the fix) is
the control: it must exceed the bound, so the probe can see a regression.

A page is Parquet's smallest read unit, so the bound needs a file with small pages; pyarrow's
default writer puts a 100 MB dictionary page in front of such a column, which the listing
reports (``dictionary_page_bytes``, a warning).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cxr_ray.data.sources import ReadOptions, dictionary_page_bytes, list_source

REPO = Path(__file__).resolve().parents[1]
ROWS, VALUE = 1500, 100_000
BLOCK = 64

_PROBE = """
import json, sys
import psutil
import pyarrow as pa, pyarrow.parquet as pq
from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions, list_source

path, mode, rows, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
options = ReadOptions(rows_per_block=rows)
# Warm up on a one-row table first (lazy imports, thread pools, allocator arenas: ~50 MB of
# RSS that any first read costs), so the growth measured below is the block's own.
for unit in list_source(warm, options):
    list(read_unit(unit, options))
    pq.ParquetFile(warm).read_row_group(0)
units = list_source(path, options)
proc, pool = psutil.Process(), pa.default_memory_pool()
rss0, pool0 = proc.memory_info().rss, pool.max_memory()
if mode == "reader":
    block = next(read_unit(units[0], options))
    got, data = block.num_rows, sum(len(v) for v in block.column("data").to_pylist())
else:  # the reader before the fix: the whole row group, then the block
    table = pq.ParquetFile(path).read_row_group(0, columns=["image", "name"])
    got, data = rows, sum(len(v) for v in table.column("image").slice(0, rows).to_pylist())
print(json.dumps({"rows": got, "data": data, "pool_peak": pool.max_memory() - pool0,
                  "rss_growth": proc.memory_info().rss - rss0}))
"""


def _write(path: Path, **options) -> Path:
    values = [os.urandom(VALUE) for _ in range(ROWS)]
    names = [f"r{i}.jpeg" for i in range(ROWS)]
    table = pa.table({"image": pa.array(values, pa.binary()), "name": names})
    pq.write_table(table, path, row_group_size=ROWS, **options)
    return path


def _probe(path: Path, mode: str) -> dict:
    warm = path.with_name("warm.parquet")
    if not warm.exists():
        pq.write_table(pa.table({"image": [os.urandom(VALUE)], "name": ["w.jpeg"]}), warm)
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, str(path), mode, str(BLOCK), str(warm)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_first_block_of_a_single_row_group_file_costs_a_block_not_the_row_group(tmp_path):
    # The layout dictionary_page_bytes' docstring recommends: no dictionary, small pages.
    path = _write(tmp_path / "one_group.parquet", use_dictionary=["name"], write_batch_size=16)
    meta = pq.ParquetFile(path).metadata
    assert meta.num_row_groups == 1 and meta.row_group(0).total_byte_size > 140e6
    block_bytes = BLOCK * VALUE
    bound = 4 * block_bytes + 16_000_000  # 41.6 MB for a 6.4 MB block; the row group is 150 MB
    got = _probe(path, "reader")
    assert got["rows"] == BLOCK and got["data"] == block_bytes
    assert got["pool_peak"] < bound, got
    assert got["rss_growth"] < bound, got
    before = _probe(path, "read_row_group")  # the control: the probe sees the whole group
    assert before["pool_peak"] > 140e6 and before["rss_growth"] > 140e6, (before, got)


def test_a_large_dictionary_page_is_reported_at_listing(tmp_path, caplog):
    # pyarrow's defaults: the first 1024 values land in the dictionary page (~25 MB here).
    values = [os.urandom(25_000) for _ in range(1100)]
    path = tmp_path / "dict.parquet"
    pq.write_table(pa.table({"image": pa.array(values, pa.binary())}), path)
    size = dictionary_page_bytes(pq.ParquetFile(path).metadata, "image")
    assert 20e6 < size < 30e6
    import cxr_ray.data.sources as sources

    old, sources.DICTIONARY_PAGE_WARN = sources.DICTIONARY_PAGE_WARN, 16 * 1024 * 1024
    try:
        with caplog.at_level(logging.WARNING, logger="cxr_ray.data.sources"):
            units = list_source(str(path), ReadOptions())
    finally:
        sources.DICTIONARY_PAGE_WARN = old
    assert sum(u.num_rows for u in units) == 1100
    warned = [r.getMessage() for r in caplog.records if "dictionary page" in r.getMessage()]
    assert len(warned) == 1 and "25 MB" in warned[0] and str(tmp_path) not in warned[0], warned
    # A file written without a dictionary for the bytes column has none.
    plain = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"image": pa.array(values[:10], pa.binary())}), plain, use_dictionary=False)
    assert dictionary_page_bytes(pq.ParquetFile(plain).metadata, "image") == 0
