"""A Delta writer that SIGKILLs itself mid-write, after some data files are on disk.

    python -m tests.scenarios.killed_writer TABLE_URI

Appends to ``TABLE_URI`` (an existing table of ``{"k": string, "v": int64}``) from a stream
of batches with a tiny target file size, so delta-rs writes data files as the stream goes;
the stream kills the process (no cleanup, no commit) after its 40th batch. Afterwards the
table's log is unchanged and its folder holds data files no version references (orphans).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator

import pyarrow as pa


def main() -> None:
    from deltalake import write_deltalake

    uri = sys.argv[1]
    schema = pa.schema([("k", pa.string()), ("v", pa.int64())])

    def batches() -> Iterator[pa.RecordBatch]:
        for n in range(10_000):
            if n == 40:
                print("killing the writer mid-write", flush=True)
                os.kill(os.getpid(), signal.SIGKILL)
            yield pa.record_batch(
                [pa.array([f"k{n}-{i}" for i in range(2000)]), pa.array(range(2000))], schema=schema
            )

    write_deltalake(
        uri, pa.RecordBatchReader.from_batches(schema, batches()), mode="append", target_file_size=64 * 1024
    )


if __name__ == "__main__":
    main()
