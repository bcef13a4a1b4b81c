"""A Ray Data datasource over read units: one read task per unit, blocks of raw bytes."""

from __future__ import annotations

import functools
from typing import Any

import pyarrow as pa
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import RAW_SCHEMA, ReadOptions, ReadUnit


def _read(unit: ReadUnit, options: ReadOptions) -> list[pa.Table] | Any:
    return read_unit(unit, options)


class ImageDatasource(Datasource):
    """Reads image bytes for ``units``; each unit becomes one read task.

    Units hold at most ``rows_per_block`` entries (a compressed tar or a Parquet row group
    streams in blocks of that size), so a block never holds more than that many images.
    """

    def __init__(self, units: list[ReadUnit], options: ReadOptions) -> None:
        super().__init__()
        self._units = units
        self._options = options

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(u.size_bytes for u in self._units) or None

    def get_read_tasks(
        self, parallelism: int, per_task_row_limit: int | None = None, data_context: Any = None
    ) -> list[ReadTask]:
        tasks = []
        for unit in self._units:
            meta = BlockMetadata(
                num_rows=unit.num_rows or None,
                size_bytes=unit.size_bytes or None,
                input_files=(unit.container,) if unit.container else None,
                exec_stats=None,
            )
            fn = functools.partial(_read, unit, self._options)
            tasks.append(ReadTask(fn, meta, schema=RAW_SCHEMA, per_task_row_limit=per_task_row_limit))
        return tasks

    def get_name(self) -> str:
        return "ReadImages"
