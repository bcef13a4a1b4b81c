"""The ``cxr-ray`` group, error handling and settings; commands live in the sibling modules.

Every command accepts ``--config FILE`` (TOML) before its name; ``CXR_*`` environment
variables and flags override the file. Invalid settings print one line per field and exit 2.
"""

from __future__ import annotations

import functools
import logging
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from cxr_ray.config import Settings, load_settings
from cxr_ray.errors import ConfigError, CxrRayError, DataError, ModelError

if TYPE_CHECKING:
    from cxr_ray.models.artifact import Artifact

F = TypeVar("F", bound=Callable[..., Any])
logger = logging.getLogger("cxr_ray")

#: Exit codes: 2 for bad usage/settings/inputs the user must fix, 1 for other failures.
EXIT_USAGE = 2


def literal_choice(owner: type, name: str) -> click.Choice:
    """A click choice of the values a settings (or options) class's ``Literal`` field allows,
    so a flag never retypes them: ``literal_choice(ScoreSettings, "explain")``."""
    hints = typing.get_type_hints(owner)
    values = [a for a in typing.get_args(hints[name]) if isinstance(a, str)]
    if not values:
        raise TypeError(f"{owner.__name__}.{name} is not a Literal of strings")
    return click.Choice(values)


def _fail(msg: str, code: int) -> None:
    click.secho(f"error: {msg}", fg="red", err=True)
    sys.exit(code)


def handle_errors(fn: F) -> F:
    """Turn cxr-ray errors into one message line and an exit code instead of a traceback.

    The one error mapping of every entry point (commands, ``jobs/``, ``trainers/``): 2 for
    what the user must fix (settings, inputs, model artifacts), 1 for other cxr-ray errors.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, ModelError) as exc:
            _fail(str(exc), EXIT_USAGE)
        except CxrRayError as exc:
            _fail(str(exc), 1)

    return wrapper  # type: ignore[return-value]


def settings_from(ctx: click.Context, overrides: dict[str, Any]) -> Settings:
    return load_settings(ctx.obj.get("config"), overrides)


def verbosity(ctx: click.Context) -> int:
    """``-v`` count given before the command name (0: Ray's own output kept quiet)."""
    return int((ctx.find_root().obj or {}).get("verbose", 0))


def require_source(uri: str, what: str = "source") -> None:
    """Refuse a local path that does not exist, before Ray starts (remote URIs: the reader's job)."""
    from cxr_ray.io import uris

    if uris.is_remote(uri):
        return
    local = Path(uri.removeprefix("file://")).expanduser()
    if not local.exists():
        raise DataError(f"{what} {uri!r} does not exist")


def load_model(uri: str, *, verify_shapes: bool = False) -> Artifact:
    """Read and verify a model artifact once, on the driver, before Ray starts.

    Card and weights hash always; tensor shapes only with ``verify_shapes`` (that imports
    torch, ~600 MB of driver memory): scoring commands leave it to whatever builds the
    network (the ONNX export, the torch engine), which refuses a mismatch the same way.
    """
    from cxr_ray.models.artifact import load_artifact

    require_source(uri, "model artifact")
    return load_artifact(uri, verify_shapes=verify_shapes)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--config",
    type=click.Path(dir_okay=False),
    default=None,
    help="TOML settings file ([train], [score], [data], [model], [ray] tables).",
)
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
@click.version_option(package_name="cxr-ray")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: int) -> None:
    """cxr-ray: fine-tune and batch-score pediatric chest X-rays on Ray.

    \b
    Typical flow:
      cxr-ray weights --link                       # offline ImageNet weights
      cxr-ray manifest DATA --out manifest.parquet # list and check every image
      cxr-ray train DATA --out model/              # Ray Train fine-tuning
      cxr-ray score ARCHIVE --model model/ --out scores/
      cxr-ray evaluate scores/predictions.parquet

    Settings come from flags, CXR_* environment variables (CXR_TRAIN__WORKERS=4) and
    --config FILE, in that order of priority. Run any command with --help for details.
    """
    level = [logging.WARNING, logging.INFO, logging.DEBUG][min(verbose, 2)]
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    ctx.ensure_object(dict)
    ctx.obj["config"] = config
    ctx.obj["verbose"] = verbose


#: Options of the ``cxr-ray`` group itself, which go before the command name.
_GROUP_FLAGS = ("-v", "-vv", "-vvv", "--verbose")


def job_args(command: str, argv: list[str]) -> list[str]:
    """``argv`` of a job entrypoint as a ``cxr-ray`` command line for ``run_command``.

    ``--config FILE`` and ``-v`` may come anywhere in a job's arguments; they move before
    the command name, where the ``cxr-ray`` group reads them.

    >>> job_args("train", ["DATA", "--out", "m", "--config", "c.toml", "-v"])
    ['--config', 'c.toml', '-v', 'train', 'DATA', '--out', 'm']
    """
    group: list[str] = []
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--":
            rest.extend([arg, *it])
        elif arg == "--config":
            value = next(it, None)  # a missing value is click's to report
            group.extend([arg] if value is None else [arg, value])
        elif arg.startswith("--config=") or arg in _GROUP_FLAGS:
            group.append(arg)
        else:
            rest.append(arg)
    return [*group, command, *rest]


def run_command(args: list[str]) -> int:
    """Run one ``cxr-ray`` command line in this process and return its exit code.

    What ``jobs/`` and ``trainers/`` call, so every entry point shares the CLI's settings,
    options and error mapping (one line and exit 2 for what the user must fix).
    """
    try:
        main.main(args=args, prog_name="cxr-ray", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return 0


def job_help(command: str, prog: str) -> str:
    """``--help`` of a job entrypoint: the command's own help under the job's name (``prog``,
    e.g. ``python -m jobs.retrain``), with the group options a job also takes anywhere."""
    cmd = main.commands[command]
    group = [p for p in main.params if p.name in ("config", "verbose")]
    job = click.Command(
        prog,
        params=[*cmd.params, *group],
        help=cmd.help,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    with click.Context(job, info_name=prog, max_content_width=100, help_option_names=["-h", "--help"]) as ctx:
        return job.get_help(ctx)


def job_main(command: str, argv: list[str], prog: str) -> int:
    """A job entrypoint: ``cxr-ray COMMAND`` with ``argv`` (``--config``/``-v`` anywhere), or
    its help under the job's own name."""
    before = argv[: argv.index("--")] if "--" in argv else argv
    if "-h" in before or "--help" in before:
        click.echo(job_help(command, prog))
        return 0
    return run_command(job_args(command, argv))
