"""Connecting to Ray, for entrypoints only (the CLI and ``jobs/``); the library never calls it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator

from cxr_ray.config import RaySettings

logger = logging.getLogger(__name__)

#: Lines of the driver's stderr that are Ray's noise, not the operator's business (matched by
#: a fixed substring). Ray Data hands every actor-pool actor its map transformer and
#: DataContext as ObjectRefs and keeps actor restarts on (``max_restarts=-1``, what makes a
#: crashed predictor come back), so Ray core logs, as an ERROR, "Actor ... has constructor
#: arguments in the object store and max_restarts > 0" (ray-project/ray#53727, #57733) for
#: every predictor actor of every run, whatever the actor's own arguments. The warning is
#: about arguments that go out of scope or are lost before a restart; these are owned and
#: held by the driver for the whole execution, so restarts work and the line is dropped.
RAY_NOISE: tuple[bytes, ...] = (b"has constructor arguments in the object store and max_restarts > 0",)


def quiet_ray_data(verbose: int) -> None:
    """Keep Ray Data's progress bars and INFO lines off the console unless ``verbose``.

    In a non-interactive terminal Ray Data logs its progress as INFO lines (hundreds per run);
    the CLI shows its own progress line instead (``cxr_ray.cli.progress``). Everything still
    goes to the session's ``ray-data.log``; ``-v`` brings Ray Data's console output back.
    """
    if verbose:
        return
    from ray.data import DataContext
    from ray.util.debug import log_once

    DataContext.get_current().enable_progress_bars = False
    # Ray Data warns once that its bars are off: that is what we asked for.
    log_once("ray_data_progress_manager_disabled")
    for handler in logging.getLogger("ray.data").handlers:
        # The console handler; Ray Data's session file handler is a plain Handler.
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)


@contextlib.contextmanager
def ray_session(
    settings: RaySettings, *, verbose: int = 0, worker_logs: bool | None = None
) -> Iterator[None]:
    """Use the Ray already initialised in this process, or start/join one for the block.

    ``address=None`` starts a local Ray (or joins the one ``RAY_ADDRESS`` names, as under
    ``ray job submit``); a Ray started here is shut down on exit. Without ``verbose`` Ray's
    INFO lines and Ray Data's progress stay off the console; ``worker_logs`` (default: only
    when verbose) forwards the workers' stdout/stderr to this process.
    """
    import ray

    quiet_ray_data(verbose)
    if ray.is_initialized():
        with filtered_stderr():
            yield
        return
    # The dashboard stays on: it also serves the state API that Ray Train's controller polls.
    kwargs: dict[str, object] = {
        "log_to_driver": bool(verbose) if worker_logs is None else worker_logs,
        "logging_level": logging.INFO if verbose else logging.WARNING,
    }
    if settings.address is not None:
        kwargs["address"] = settings.address
    elif settings.num_cpus is not None:
        kwargs["num_cpus"] = settings.num_cpus
    ray.init(**kwargs)  # type: ignore[arg-type]
    try:
        # After ray.init: the processes a local Ray starts keep the real stderr.
        with filtered_stderr():
            yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def filtered_stderr(drop: tuple[bytes, ...] = RAY_NOISE) -> Iterator[None]:
    """File descriptor 2 (Ray's C++ logging writes there directly) through a filter that
    drops the lines containing one of ``drop`` and passes everything else on at once.

    A partial line is held back only while it may be a Ray log line (``[`` first); anything
    else (a progress bar's ``\\r`` redraw) goes straight through. On exit fd 2 is restored and
    what is still in the pipe is passed on.
    """
    if os.name != "posix":
        yield
        return
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    pump = threading.Thread(target=_pump, args=(read_end, saved, drop), name="cxr-stderr-filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's write end: the pump reads to its end and stops
        # A process started inside the block may still hold the write end: never wait on it.
        pump.join(timeout=5)


def _pump(read_end: int, out: int, drop: tuple[bytes, ...]) -> None:
    """Copy ``read_end`` to ``out`` until end of file, less the lines containing ``drop``."""
    pending = b""
    dropped = 0
    try:
        while chunk := os.read(read_end, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            kept = [line + b"\n" for line in lines if not any(d in line for d in drop)]
            dropped += len(lines) - len(kept)
            if pending and not pending.startswith(b"["):
                kept.append(pending)
                pending = b""
            _write_all(out, b"".join(kept))
        if pending and not any(d in pending for d in drop):
            _write_all(out, pending)
    finally:
        os.close(read_end)
        os.close(out)
    if dropped:
        logger.debug("dropped %d line(s) of Ray's actor-argument warning (ray-project/ray#53727)", dropped)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data``; a closed or broken stderr drops it (the pump must keep reading,
    or every later write to fd 2 would block on a full pipe)."""
    view = memoryview(data)
    with contextlib.suppress(OSError):
        while view:
            view = view[os.write(fd, view) :]
