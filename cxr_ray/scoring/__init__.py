"""Batch scoring with Ray Data: sources -> decode tasks -> predictor actors -> Parquet.

``pipeline.score(source, model, out, settings)`` plans and runs a scoring run (read and
decode in Ray read tasks, an actor pool of ``engines``, the driver writing rows as they
arrive) and returns a ``result.ScoreResult`` (``summary.json``); ``schema`` is the
predictions table's schema, ``stages`` the per-batch work, ``studies`` the per-study rows,
``evaluation`` the metrics of labelled runs, ``performance`` the check against the card,
``drift`` (streaming) / ``drift_checks`` (the rows) / ``drift_units`` (patients as the
tests' units) / ``drift_stats`` / ``drift_io`` the drift check and its outputs, ``estimate`` the
label-free performance estimate, ``explain`` Grad-CAM, and ``pseudonymize`` the research
export. ``screen.screen`` ranks a whole archive's flagged studies; ``nightly.run_nightly``
scores only new images into the Delta tables of a nightly root (``ledger``, ``side_tables``).
"""
