"""Leases: "one run at a time on this scope", expiring when the holder dies.

A lease is a row ``(scope, holder, expires_at, ...)`` in a small Delta table (``ROOT/leases``
for nightly runs). Taking, renewing and handing back a lease is a compare-and-swap commit
on that table (``tables.append_if_unchanged``-style: the commit only lands on the version
that was read), so it works wherever the Delta tables do, on a local folder or on ``s3://``,
with no other service. The holder renews it every ``ttl_s / 3`` seconds from a background
thread; a holder that is killed stops renewing and its lease expires ``ttl_s`` seconds
later, when another run may take it over.

A holder whose renewals keep failing (the store unreachable or refusing writes) marks the
lease *lost* as soon as it cannot renew before the expiry (two failed renewals in a row), as
it does when it finds the lease taken over; ``ensure_held`` then raises ``LeaseLostError``,
and a nightly run calls it before every block's bookkeeping and right before its commit, so
a run that lost its lease stops and commits nothing.

A lease avoids doing work twice; it is not what keeps the tables right. A holder that stalls
past its expiry (a paused VM) may find its lease taken over: both then run, and the
predictions commit (``cxr_ray.scoring.ledger.commit_new``) still records each image once.
Clocks of the hosts sharing a root should agree to well within ``ttl_s``.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa
from deltalake import CommitProperties, DeltaTable, write_deltalake
from deltalake.exceptions import CommitFailedError

from cxr_ray.errors import CxrRayError
from cxr_ray.io import tables

logger = logging.getLogger(__name__)

LEASE_SCHEMA = pa.schema(
    [
        pa.field("scope", pa.string(), nullable=False),
        pa.field("holder", pa.string(), nullable=False),
        pa.field("run_id", pa.string()),
        pa.field("host", pa.string()),
        pa.field("pid", pa.int64()),
        pa.field("acquired_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("expires_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)


class LeaseLostError(CxrRayError):
    """The lease was taken over, or could not be renewed before it expired: stop the work."""


@dataclass(frozen=True)
class LeaseInfo:
    scope: str
    holder: str
    run_id: str | None
    host: str | None
    pid: int | None
    expires_at: datetime


def _now() -> datetime:
    return datetime.now(UTC)


class Lease:
    """A lease on ``scope`` in the lease table at ``uri``.

    ::

        lease = Lease(uri, "nightly/model-v3", ttl_s=300, run_id=run_id)
        if lease.acquire(wait_s=3600):
            with lease.keep_alive():
                ...  # the work
            lease.release()
    """

    def __init__(
        self,
        uri: str,
        scope: str,
        *,
        ttl_s: float = 300.0,
        run_id: str | None = None,
        storage_options: tables.StorageOptions = None,
    ) -> None:
        self.uri, self.scope, self.ttl_s, self.run_id = uri, scope, ttl_s, run_id
        self.storage_options = storage_options
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        #: Set when a renewal found the lease taken over by another holder, or renewals
        #: kept failing until the lease would expire (``lost_reason`` says which).
        self.lost = False
        self.lost_reason: str | None = None
        #: When the lease held by this holder expires (set by each successful take/renewal).
        self.expires_at: datetime | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- reading ----------------------------------------------------------------------
    def _table(self) -> DeltaTable:
        return tables.ensure_table(
            self.uri, LEASE_SCHEMA, description="cxr-ray leases", storage_options=self.storage_options
        )

    def current(self) -> LeaseInfo | None:
        """The live lease on this scope (any holder), or ``None``."""
        return _live(self._rows(self._table()), self.scope)

    def _rows(self, dt: DeltaTable) -> list[dict[str, Any]]:
        return tables.read(dt, where=f"scope = {tables.sql_literal(self.scope)}").to_pylist()

    # -- writing ----------------------------------------------------------------------
    def _swap(self) -> str:
        """One compare-and-swap: 'held' (taken or renewed) or 'busy' (another live holder)."""
        dt = self._table()
        live = _live(self._rows(dt), self.scope)
        if live is not None and live.holder != self.holder:
            return "busy"
        now = _now()
        expires = now + timedelta(seconds=self.ttl_s)
        row = pa.table(
            {
                "scope": [self.scope],
                "holder": [self.holder],
                "run_id": [self.run_id],
                "host": [socket.gethostname()],
                "pid": [os.getpid()],
                "acquired_at": [now],
                "expires_at": [expires],
            },
            schema=LEASE_SCHEMA,
        )
        write_deltalake(
            dt,
            row,
            mode="overwrite",
            predicate=f"scope = {tables.sql_literal(self.scope)}",
            commit_properties=CommitProperties(
                custom_metadata={"lease": self.scope, "holder": self.holder}, max_commit_retries=0
            ),
        )
        self.expires_at = expires
        return "held"

    def try_acquire(self) -> bool:
        for attempt in range(tables.COMMIT_ATTEMPTS):
            try:
                state = self._swap()
            except CommitFailedError:
                tables.backoff(attempt)  # someone committed to the lease table: read again
                continue
            self.held = state == "held"
            return self.held
        return False

    def acquire(self, *, wait_s: float = 0.0, poll_s: float | None = None) -> bool:
        """Take the lease, polling up to ``wait_s`` seconds while another holder has it."""
        deadline = time.monotonic() + wait_s
        poll = poll_s if poll_s is not None else max(0.5, min(10.0, self.ttl_s / 4))
        while True:
            if self.try_acquire():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(poll, max(0.0, deadline - time.monotonic())) or 0.01)

    def renew(self) -> bool:
        for attempt in range(tables.COMMIT_ATTEMPTS):
            try:
                state = self._swap()
            except CommitFailedError:
                tables.backoff(attempt)
                continue
            if state != "held":
                self._mark_lost("taken over by another run after it expired")
            return state == "held"
        return False

    def _mark_lost(self, why: str) -> None:
        self.lost, self.held, self.lost_reason = True, False, why
        logger.warning("lease %s lost: %s", self.scope, why)

    def ensure_held(self) -> None:
        """Raise ``LeaseLostError`` unless this holder still holds an unexpired lease."""
        if not self.lost and self.expires_at is not None and _now() >= self.expires_at:
            self._mark_lost("it expired before a renewal landed")
        if self.lost:
            raise LeaseLostError(
                f"the lease {self.scope} was lost ({self.lost_reason}): stopping before any commit; "
                "nothing of this run was recorded, the next run scores its images"
            )

    def release(self) -> None:
        """Hand the lease back (a no-op when another holder took it over)."""
        self._stop_thread()
        if not self.held:
            return
        dt = self._table()
        pred = f"scope = {tables.sql_literal(self.scope)} AND holder = {tables.sql_literal(self.holder)}"

        def delete() -> None:
            dt.update_incremental()
            dt.delete(pred)

        tables.with_commit_retries(delete, what=f"releasing lease {self.scope}")
        self.held = False

    # -- keeping it -------------------------------------------------------------------
    def keep_alive(self) -> _KeepAlive:
        return _KeepAlive(self)

    def _run(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                if self.renew():
                    continue
                if self.lost:
                    return
                failure = "the lease table kept changing"
            except Exception as exc:  # a flaky store: retry while the lease is still valid
                failure = type(exc).__name__
                logger.warning("lease %s: renewal failed (%s)", self.scope, failure)
            # The next try would come too late: another run may take the lease by then.
            if self.expires_at is None or _now() + timedelta(seconds=interval) >= self.expires_at:
                self._mark_lost(f"renewals kept failing ({failure})")
                return

    def _stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None


class _KeepAlive:
    def __init__(self, lease: Lease) -> None:
        self.lease = lease

    def __enter__(self) -> Lease:
        lease = self.lease
        lease._stop.clear()
        lease._thread = threading.Thread(target=lease._run, name=f"lease-{lease.scope}", daemon=True)
        lease._thread.start()
        return lease

    def __exit__(self, *exc: object) -> None:
        self.lease._stop_thread()


def _live(rows: list[dict[str, Any]], scope: str) -> LeaseInfo | None:
    now = _now()
    live = [r for r in rows if r["scope"] == scope and r["expires_at"] > now]
    if not live:
        return None
    r = max(live, key=lambda r: r["expires_at"])
    return LeaseInfo(r["scope"], r["holder"], r["run_id"], r["host"], r["pid"], r["expires_at"])
