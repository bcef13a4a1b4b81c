"""What every job entrypoint shares: settings from --config/env/flags, Ray, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from cxr_ray.cli.runtime import ray_session
from cxr_ray.config import Settings, load_settings
from cxr_ray.errors import ConfigError, CxrRayError, DataError, ModelError


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--config", default=None, help="TOML settings file")
    return p


def run(
    main: Callable[[argparse.Namespace, Settings], Any],
    args: argparse.Namespace,
    overrides: dict[str, Any] | None = None,
) -> int:
    """Build settings, join Ray (the cluster under `ray job submit`), run ``main``."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.config, overrides)
        with ray_session(settings.ray):
            main(args, settings)
    except (ConfigError, DataError, ModelError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CxrRayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0
