"""Storage: where bytes and tables live, local or in object storage.

``storage`` reads and writes bytes and Parquet on paths or ``s3://``/``gs://`` URIs through
pyarrow filesystems, with explicit schemas and atomic commits (``write_table``,
``atomic_parquet_writer``, ``append_table``); ``uris`` names images (paths, object-store
URIs, ``archive.zip!/member`` members) and refuses unsafe ones; ``tables`` wraps delta-rs for
the nightly root (``insert_new`` with compare-and-swap retries, ``query``, time travel,
``optimize``/``vacuum``); ``lease`` is "one run at a time on this scope", expiring when its
holder dies; ``conditional_puts`` checks at start-up that an object store honours
put-if-absent. The bottom layer: it imports no other layer.
"""
