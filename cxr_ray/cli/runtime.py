"""Connecting to Ray, for entrypoints only (the CLI and ``jobs/``); the library never calls it."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from cxr_ray.config import RaySettings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def ray_session(settings: RaySettings, *, quiet: bool = False) -> Iterator[None]:
    """Use the Ray already initialised in this process, or start/join one for the block.

    ``address=None`` starts a local Ray (or joins the one ``RAY_ADDRESS`` names, as under
    ``ray job submit``); a Ray started here is shut down on exit.
    """
    import ray

    if ray.is_initialized():
        yield
        return
    # The dashboard also serves the state API that Ray Train's controller polls.
    kwargs: dict[str, object] = {"log_to_driver": not quiet}
    if settings.address is not None:
        kwargs["address"] = settings.address
    elif settings.num_cpus is not None:
        kwargs["num_cpus"] = settings.num_cpus
    ray.init(**kwargs)  # type: ignore[arg-type]
    try:
        yield
    finally:
        ray.shutdown()
