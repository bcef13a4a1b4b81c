"""Connecting to Ray, for entrypoints only (the CLI and ``jobs/``); the library never calls it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from cxr_ray.config import RaySettings

logger = logging.getLogger(__name__)


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
        yield
    finally:
        ray.shutdown()
