"""Nightly incremental scoring into a root of Delta Lake tables (layout: ``ledger``).

    result = run_nightly(source, artifact, root, settings)
    print(format_nightly(result))

One run: take the lease of (root, model version) -> score only the images the model version
has not scored (``ledger.PredictionsSeen``, checked block by block inside the decode tasks)
into ROOT/runs/<run_id>/ -> commit the new rows to ROOT/predictions in one atomic commit
(``ledger.commit_new``; its commit metadata records the run's listing time) -> derive the
side tables (ROOT/studies, ROOT/metrics_history, ROOT/drift_history) from the committed rows
(``side_tables.complete_side_tables``, keyed, exactly once; also run at start-up, so a run
killed after its commit is completed by the next) -> hand the lease back.

A PACS source (``dicomweb://``) without an explicit ``dicomweb.study_date`` lists only the
studies dated from the last committed run's *listing time*, as a date in the PACS's own time
zone (``dicomweb.timezone``), minus ``dicomweb.lookback_days`` (default 2): a late arrival
dated the previous local day, or a run crossing midnight, is listed again, and the seen-check
drops what was already scored. An ``s3://`` root is checked at start-up for conditional puts
(``conditional_puts.check_conditional_puts``); a store that ignores them is refused (``ConfigError``).
A run whose lease is lost (taken over, or renewals failing until it would expire) stops with
``LeaseLostError`` before its commit. What overlapping runs do:

- A run that finds another live run on the same root and model version waits for it
  (``on_busy="wait"``, up to ``max_wait_s``) and then scores what is still new (usually
  nothing), or returns at once (``on_busy="exit"``); either way it exits cleanly, its result
  saying why (``skipped_reason``).
- A run killed at any moment leaves no visible rows (its staged files in ROOT/runs/<run_id>/
  are never read); its lease expires ``lease_ttl_s`` seconds later and the next run scores
  what it had not committed.
- Without the lease (``lease=False``), or when a lease lapses under a stalled holder, runs
  overlap, and the predictions table still records each (image_id, model_version) once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal
from zoneinfo import ZoneInfo

import pyarrow as pa

from cxr_ray.config import Settings
from cxr_ray.io import storage, tables, uris
from cxr_ray.io.conditional_puts import check_conditional_puts
from cxr_ray.io.lease import Lease, LeaseInfo
from cxr_ray.models.artifact import Artifact, load_artifact
from cxr_ray.scoring import ledger, side_tables
from cxr_ray.scoring.drift_io import drift_line
from cxr_ray.scoring.pipeline import new_run_id, score
from cxr_ray.scoring.result import ScoreResult, format_summary

logger = logging.getLogger(__name__)

#: ROOT/drift_history: the drift figures of every nightly run that scored images.
DRIFT_HISTORY = ledger.DRIFT_HISTORY


@dataclass(frozen=True)
class NightlyOptions:
    """How a nightly run shares its root with others."""

    #: Another run holds the lease: ``wait`` for it (up to ``max_wait_s``) or ``exit`` now.
    on_busy: Literal["wait", "exit"] = "wait"
    max_wait_s: float = 6 * 3600.0
    #: A killed run's lease expires this long after its last renewal (renewed every third).
    lease_ttl_s: float = 300.0
    #: Take a lease at all (correctness never depends on it; it avoids scoring twice).
    lease: bool = True
    #: delta-rs storage options for ``s3://`` roots (``AWS_ENDPOINT_URL``...); ``None``: the
    #: ``AWS_*`` environment of the process.
    storage_options: Mapping[str, str] | None = None


@dataclass
class NightlyResult:
    root: str
    run_id: str
    model_version: str
    #: Images scored by this run (error rows included).
    new_images: int = 0
    #: Images of the source skipped because the model version had already scored them.
    already_scored: int = 0
    #: Rows this run committed to ROOT/predictions.
    added_rows: int = 0
    #: Scored rows not committed: a concurrent run committed the same images first.
    duplicates: int = 0
    #: The predictions table version after this run (``cxr-ray history --version``).
    table_version: int | None = None
    score: ScoreResult | None = None
    #: Seconds spent waiting for another run's lease.
    waited_s: float = 0.0
    #: The other run's lease when this one did not score (``on_busy``).
    busy: LeaseInfo | None = None
    #: Why nothing was scored, when nothing was.
    skipped_reason: str | None = None
    commit_attempts: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class _SeenCounter:
    """A Ray actor counting the images the decode tasks skipped as already scored."""

    def __init__(self) -> None:
        self.n = 0

    def add(self, n: int) -> None:
        self.n += n

    def total(self) -> int:
        return self.n


@dataclass(frozen=True)
class _CountingSeen:
    inner: ledger.PredictionsSeen
    counter: Any

    def unseen(self, ids: list[str]) -> list[str]:
        new = self.inner.unseen(ids)
        if len(ids) > len(new):
            import ray

            ray.get(self.counter.add.remote(len(ids) - len(new)))  # waited: counted before the run ends
        return new


def run_nightly(
    source: str,
    artifact: Artifact | str,
    root: str,
    settings: Settings,
    *,
    on_block: Callable[[pa.Table], None] | None = None,
    options: NightlyOptions | None = None,
    after_commit: Callable[[NightlyResult], None] | None = None,
) -> NightlyResult:
    """Score the images of ``source`` that the model has not scored yet into ``root``.

    ``after_commit`` runs after the commit and the side tables, under the lease, also when
    nothing new was scored (``cxr_ray.writeback.deliver.deliver_nightly``: results to a PACS).
    """
    import ray

    opts = options or NightlyOptions()
    art = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify_shapes=False)
    version = art.card.version
    result = NightlyResult(root, new_run_id(), version)
    so = opts.storage_options
    if root.startswith("s3://"):
        check_conditional_puts(root, storage_options=so)
    ledger.ensure_predictions(root, so)
    lease = Lease(
        ledger.table(root, ledger.LEASES),
        f"nightly/{version}",
        ttl_s=opts.lease_ttl_s,
        run_id=result.run_id,
        storage_options=so,
    )
    if opts.lease and not _take_lease(lease, opts, result):
        return result
    counter: Any = ray.remote(_SeenCounter).options(num_cpus=0).remote()
    try:
        _complete_side_tables(root, art, result, so)  # runs killed after their commit
        settings = _study_date_window(source, root, version, settings, result, so)
        if opts.lease:
            with lease.keep_alive():
                _score_and_commit(source, art, root, settings, result, counter, on_block, so, lease)
                if after_commit is not None:
                    lease.ensure_held()
                    after_commit(result)
        else:
            _score_and_commit(source, art, root, settings, result, counter, on_block, so, None)
            if after_commit is not None:
                after_commit(result)
        result.already_scored = int(ray.get(counter.total.remote()))
    finally:
        ray.kill(counter)
        if opts.lease:
            lease.release()
    return result


def _take_lease(lease: Lease, opts: NightlyOptions, result: NightlyResult) -> bool:
    t0 = time.monotonic()
    got = lease.acquire(wait_s=opts.max_wait_s if opts.on_busy == "wait" else 0.0)
    result.waited_s = time.monotonic() - t0
    if not got:
        result.busy = lease.current()
        who = f"run {result.busy.run_id}" if result.busy else "another run"
        result.skipped_reason = (
            f"{who} holds the nightly lease for model {result.model_version} on this root"
            + (f" (waited {result.waited_s:.0f} s)" if opts.on_busy == "wait" else "")
            + "; nothing scored"
        )
        logger.info(result.skipped_reason)
    return got


def _complete_side_tables(
    root: str, art: Artifact, result: NightlyResult, so: Mapping[str, str] | None
) -> None:
    done = side_tables.complete_side_tables(
        root, art.card.version, frontal_views=art.card.intended_use_policy.views, storage_options=so
    )
    result.extra.setdefault("side_tables_derived", []).extend(done)


#: Commit metadata keys of a nightly predictions commit.
LISTED_AT = "cxr_ray.listed_at"
MODEL_VERSION = "cxr_ray.model_version"


def last_listed_at(
    root: str, model_version: str, storage_options: Mapping[str, str] | None = None
) -> datetime | None:
    """When the last run of ``model_version`` that committed rows began listing its source
    (its commit's ``cxr_ray.listed_at``); for roots written before it was recorded, the
    latest ``scored_at`` of the model version's rows; ``None`` for a new root."""
    uri = ledger.table(root, ledger.PREDICTIONS)
    for limit in (64, 4096, None):  # newest first; most roots answer in the first page
        commits = tables.history(uri, limit=limit, storage_options=storage_options)
        for c in commits:
            if c.get(MODEL_VERSION) == model_version and c.get(LISTED_AT):
                return datetime.fromisoformat(str(c[LISTED_AT]))
        if limit is None or len(commits) < limit:
            break
    dt = tables.open_table(uri, storage_options=storage_options)
    t = tables.query(
        f"SELECT max(scored_at) AS last FROM t WHERE model_version = {tables.sql_literal(model_version)}",
        {"t": dt},
    )
    last = t["last"][0].as_py() if t.num_rows else None
    return last if isinstance(last, datetime) else None


def window_start(listed_at: datetime, timezone: str, lookback_days: int) -> date:
    """The first ``StudyDate`` the next run lists: the listing time's date where the PACS is
    (``timezone``, an IANA name) minus the look-back margin.

    >>> window_start(datetime(2026, 12, 2, 1, 30, tzinfo=UTC), "America/New_York", 0)
    datetime.date(2026, 12, 1)
    """
    at = listed_at if listed_at.tzinfo is not None else listed_at.replace(tzinfo=UTC)
    return at.astimezone(ZoneInfo(timezone)).date() - timedelta(days=lookback_days)


def _study_date_window(
    source: str,
    root: str,
    version: str,
    settings: Settings,
    result: NightlyResult,
    so: Mapping[str, str] | None,
) -> Settings:
    """For a PACS source without an explicit ``dicomweb.study_date``: only the studies dated
    from ``window_start`` of the last committed run's listing time on (module docstring), so
    a nightly run lists and retrieves the new studies, not the whole archive. The window is
    recorded in the result."""
    pacs = source.lower().startswith(("dicomweb://", "dicomwebs://", "dicom://"))  # DIMSE too
    if not pacs or settings.dicomweb.study_date is not None:
        return settings
    listed = last_listed_at(root, version, so)
    if listed is None:
        return settings
    dw = settings.dicomweb
    window = f"{window_start(listed, dw.timezone, dw.lookback_days):%Y%m%d}-"
    result.extra["study_date"] = window
    result.extra["window_note"] = (
        f"the last committed run's listing ({listed.isoformat(timespec='seconds')}) as a "
        f"{dw.timezone} date, {dw.lookback_days} day(s) back"
    )
    logger.info("nightly %s: studies dated %s (%s)", result.run_id, window, result.extra["window_note"])
    return settings.model_copy(update={"dicomweb": dw.model_copy(update={"study_date": window})})


def _score_and_commit(
    source: str,
    art: Artifact,
    root: str,
    settings: Settings,
    result: NightlyResult,
    counter: Any,
    on_block: Callable[[pa.Table], None] | None,
    so: Mapping[str, str] | None,
    lease: Lease | None,
) -> None:
    version, run_id = art.card.version, result.run_id
    predictions = ledger.table(root, ledger.PREDICTIONS)
    out = storage.join(root, ledger.RUNS, run_id)
    seen = _CountingSeen(ledger.PredictionsSeen(predictions, version, so), counter)

    def each_block(block: pa.Table) -> None:
        if lease is not None:
            lease.ensure_held()  # a run that lost its lease stops at its next block
        if on_block is not None:
            on_block(block)

    listed_at = datetime.now(UTC)  # before the listing starts: the next window errs early
    sr = result.score = score(source, art, out, settings, run_id=run_id, seen=seen, on_block=each_block)
    result.new_images = sr.images
    staged = storage.join(out, "predictions.parquet")
    if lease is not None:
        lease.ensure_held()  # nothing is committed by a run that lost its lease
    commit = ledger.commit_new(
        predictions,
        ledger.staged_blocks(staged),
        model_version=version,
        metadata={
            "cxr_ray.run_id": run_id,
            "cxr_ray.operation": "nightly",
            "cxr_ray.images": sr.images,
            MODEL_VERSION: version,
            LISTED_AT: listed_at.isoformat(),
        },
        storage_options=so,
    )
    result.added_rows, result.duplicates = commit.added, commit.duplicates
    result.table_version, result.commit_attempts = commit.version, commit.attempts
    # Studies, metrics and drift rows of what this run committed (and of any run lacking them).
    _complete_side_tables(root, art, result, so)
    # The table is the record now; the staged copy would only be a second truth.
    fs, path = uris.resolve(staged)
    fs.delete_file(path)
    logger.info(
        "nightly %s: %d scored, %d committed (table version %s, %d attempt(s))",
        run_id,
        sr.images,
        commit.added,
        commit.version,
        commit.attempts,
    )


def format_nightly(r: NightlyResult) -> str:
    """A short summary (counts only: no patient identifiers or file names)."""
    head = f"nightly {r.run_id} (model {r.model_version}): "
    if r.skipped_reason:
        return head + r.skipped_reason
    lines = [
        head + f"{r.new_images} new images scored, {r.already_scored} already scored, "
        f"{r.added_rows} rows added to {storage.join(r.root, ledger.PREDICTIONS)}"
        + (f" (table version {r.table_version})" if r.table_version is not None else "")
    ]
    if r.duplicates:
        lines.append(
            f"{r.duplicates} rows left out: their images were already recorded "
            "(the same file bytes twice in the source, or committed first by a concurrent run)"
        )
    if "delivery" in r.extra:
        lines.append(str(r.extra["delivery"]))
    if "study_date" in r.extra:
        lines.append(f"PACS studies dated {r.extra['study_date']} (from {r.extra['window_note']})")
    earlier = [x for x in r.extra.get("side_tables_derived", []) if x != r.run_id]
    if earlier:
        lines.append(f"side tables completed for {len(earlier)} earlier run(s) stopped after their commit")
    if r.waited_s >= 1:
        lines.append(f"waited {r.waited_s:.0f} s for another run on this root")
    if r.score is not None:
        lines.extend(format_summary(r.score).splitlines()[1:2])
        drift = drift_line(r.score.drift) if r.score.ok else None
        if drift is not None:
            lines.append(drift)
        lines.extend(ln for ln in format_summary(r.score).splitlines() if ln.startswith("  error:"))
    return "\n".join(lines)
