"""Start-up check of an object store: does it honour conditional puts (``If-None-Match``)?

::

    check_conditional_puts("s3://bucket/nightly", storage_options=so)  # ConfigError if not
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Mapping
from typing import Any

from cxr_ray.errors import ConfigError, DataError

#: Where ``check_conditional_puts`` writes its probe object (an underscore: no table of the
#: root, skipped by vacuum).
PROBE_FOLDER = "_cxr_ray_probe"
#: ``storage_options`` keys passed on to the probe's S3 client (the rest are delta-rs's own).
_S3_KEYS = {
    "aws_access_key_id",
    "aws_secret_access_key",
    "aws_session_token",
    "aws_region",
    "aws_endpoint_url",
    "aws_endpoint",
}


def check_conditional_puts(root: str, *, storage_options: Mapping[str, str] | None = None) -> None:
    """Refuse an S3 store that does not honour put-if-absent (``If-None-Match: *``).

    Every Delta commit here is a compare-and-swap that relies on it: on a store that accepts
    the header and overwrites anyway, two writers that raced for the same version both
    "succeed" and the later log entry silently replaces the earlier (rows lost, images scored
    twice). The check is the race's last step, for real: one conditional ``PUT`` of a fresh
    object under ``ROOT/_cxr_ray_probe/``, then a second one of the same key, which the store
    must refuse; otherwise ``ConfigError``. Uses obstore (the Python binding of the Rust
    ``object_store`` crate delta-rs itself commits with); the probe object is deleted after.
    """
    try:
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError
        from obstore.store import from_url
    except ImportError:  # pragma: no cover - a declared dependency
        raise ConfigError("checking an s3:// root needs the obstore package (pip install obstore)") from None
    opts = {k.lower(): v for k, v in (storage_options or {}).items()}
    config: Any = {k: v for k, v in opts.items() if k in _S3_KEYS} or None
    # Without options the client reads the AWS_* environment, as delta-rs does (an empty
    # mapping given would replace what the environment says).
    client: Any = {"allow_http": True} if opts.get("aws_allow_http", "").lower() == "true" else None
    key = f"{uuid.uuid4().hex}.probe"
    try:
        store = from_url(f"{root.rstrip('/')}/{PROBE_FOLDER}", config=config, client_options=client)
        obstore.put(store, key, b"first", mode="create")
    except Exception as exc:
        raise DataError(f"cannot write a probe object under {root}: {type(exc).__name__}") from None
    try:
        obstore.put(store, key, b"second", mode="create")
    except (AlreadyExistsError, PreconditionError):
        return  # refused: the store honours conditional puts
    finally:
        with contextlib.suppress(Exception):
            obstore.delete(store, key)
    raise ConfigError(
        f"the object store of {root} does not honour conditional puts (If-None-Match: a second "
        "create of the same object was accepted): concurrent Delta commits would overwrite each "
        "other; use a store that does (AWS S3, MinIO, SeaweedFS, Cloudflare R2)"
    )
