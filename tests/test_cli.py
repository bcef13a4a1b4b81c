"""The ``cxr-ray`` command line: exit codes, one-line errors before Ray starts, progress, commands.

Checks that must prove Ray never started run the CLI in a subprocess with its own
``RAY_TMPDIR``: a Ray started by the command would leave its session folder there.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_ray.cli import job_args, main, run_command
from cxr_ray.cli.progress import Progress
from cxr_ray.data.synthetic import jpeg_bytes, kermany_name
from cxr_ray.vocabulary import ARCHITECTURES, ENGINES, INTENSITY_MODES
from tests import imaging

REPO = Path(__file__).resolve().parents[1]


def _cli(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    raytmp = tmp_path / "raytmp"
    raytmp.mkdir(exist_ok=True)
    full_env = os.environ | {"RAY_TMPDIR": str(raytmp), "RAY_USAGE_STATS_ENABLED": "0"} | (env or {})
    return subprocess.run(
        [sys.executable, "-m", "cxr_ray", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _assert_one_line_error(proc: subprocess.CompletedProcess, tmp_path: Path, *needles: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not (tmp_path / "raytmp" / "ray").exists(), "Ray was started before the check"


@pytest.fixture()
def labelled(tmp_path: Path) -> Path:
    return imaging.kermany_folder(tmp_path / "xrays", per_class=2, size=(96, 80))


@pytest.mark.parametrize(
    ("flag", "value", "field", "allowed"),
    [
        ("--intensity", "sharpen", "model.intensity", INTENSITY_MODES),
        ("--arch", "vgg11", "model.arch", ARCHITECTURES),
    ],
)
def test_train_refuses_unknown_vocabulary_before_ray(tmp_path, labelled, flag, value, field, allowed):
    proc = _cli(["train", str(labelled), "--out", str(tmp_path / "m"), flag, value], tmp_path)
    _assert_one_line_error(proc, tmp_path, field, repr(value), *allowed)


def test_score_of_a_missing_source_fails_before_ray(tmp_path, tiny_artifact):
    proc = _cli(
        ["score", str(tmp_path / "nonexistent"), "--model", str(tiny_artifact), "--out", str(tmp_path / "o")],
        tmp_path,
    )
    _assert_one_line_error(proc, tmp_path, "source", "does not exist")


def test_unknown_engine_from_the_environment_fails_before_ray(tmp_path, labelled, tiny_artifact):
    proc = _cli(
        ["nightly", str(labelled), "--model", str(tiny_artifact), "--root", str(tmp_path / "n")],
        tmp_path,
        env={"CXR_SCORE__ENGINE": "tpu"},
    )
    _assert_one_line_error(proc, tmp_path, "score.engine", "CXR_SCORE__ENGINE", *ENGINES)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["score", "{src}", "--model", "{tmp}/no-model", "--out", "{tmp}/o"], "model artifact"),
        (["score", "{src}", "--model", "{src}", "--out", "{tmp}/o"], "model_card.json is missing"),
        (["screen", "{tmp}/nope", "--model", "{model}", "--out", "{tmp}/o"], "does not exist"),
        (["nightly", "{tmp}/nope", "--model", "{model}", "--root", "{tmp}/r"], "does not exist"),
        (["train", "{tmp}/nope", "--out", "{tmp}/m"], "training data"),
        (["manifest", "{tmp}/nope", "--out", "{tmp}/m.parquet"], "does not exist"),
        (["score", "{src}", "--model", "{model}", "--out", "{tmp}/o", "--engine", "tpu"], "score.engine"),
        (["--config", "{tmp}/none.toml", "score", "{src}", "--model", "m", "--out", "o"], "config file"),
    ],
)
def test_preflight_and_settings_errors_exit_2_with_one_line(args, needle, tmp_path, labelled, tiny_artifact):
    args = [a.format(tmp=tmp_path, src=labelled, model=tiny_artifact) for a in args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_several_invalid_settings_give_one_line_each(tmp_path, labelled):
    env = {"CXR_TRAIN__WORKERS": "0", "CXR_MODEL__INTENSITY": "sharpen"}
    result = CliRunner().invoke(main, ["train", str(labelled), "--out", str(tmp_path / "m")], env=env)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0] == "error: invalid settings:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == ["model.intensity", "train.workers"]


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--help"], 0),
        (["score", "--help"], 0),
        (["score", "x", "--model", "m", "--out", "o", "--no-such-option"], 2),
        (["score", "x"], 2),  # missing required --model/--out
        (["no-such-command"], 2),
        (["score", "/nonexistent-cxr-ray-source", "--model", "m", "--out", "o"], 2),
    ],
)
def test_run_command_returns_the_exit_code(args, code, capsys):
    assert run_command(args) == code
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    if code == 2:
        assert "Error" in captured.err or "error:" in captured.err


def test_job_args_moves_group_options_before_the_command():
    assert job_args("screen", ["SRC", "--config", "c.toml", "--model", "m", "-v", "--out", "o"]) == [
        "--config",
        "c.toml",
        "-v",
        "screen",
        "SRC",
        "--model",
        "m",
        "--out",
        "o",
    ]
    assert job_args("train", ["--config=c.toml", "D"]) == ["--config=c.toml", "train", "D"]
    assert job_args("train", ["D", "--", "-v"]) == ["train", "D", "--", "-v"]


def _block(statuses: list[str]) -> pa.Table:
    return pa.table(
        {
            "uri": [f"/pacs/person{i}_bacteria_{i}.jpeg" for i in range(len(statuses))],
            "status": statuses,
        }
    )


def test_progress_prints_a_short_line_every_n_images_without_names():
    out = io.StringIO()
    with Progress("scoring", stream=out, every=10, interval_s=3600, tty=False) as progress:
        for _ in range(6):
            progress(_block(["ok", "ok", "error", "ok"]))
    lines = out.getvalue().splitlines()
    assert progress.images == 24 and progress.errors == 6
    assert len(lines) == 2  # at 12 and at 24 images
    assert lines[0].startswith("scoring: 12 images (3 errors)") and "img/s" in lines[0]
    assert lines[1].startswith("scoring: 24 images (6 errors)")
    assert "person" not in out.getvalue()


def test_progress_on_a_terminal_is_a_bar_not_lines():
    out = io.StringIO()
    with Progress("scoring", stream=out, every=1, tty=True) as progress:
        progress(_block(["ok"] * 7))
    drawn = out.getvalue()
    assert progress.images == 7 and progress.lines == 0
    assert "scoring:" in drawn and "img/s" in drawn and "\n" not in drawn  # redrawn in place


def test_score_cli_end_to_end_one_class_report_has_no_legend_warning(ray_local, tiny_artifact, tmp_path):
    """Every labelled image normal: the ROC plot has no curve (and must not warn about a legend)."""
    import warnings

    src = tmp_path / "normals"
    src.mkdir()
    for i in range(6):
        (src / kermany_name("normal", i)).write_bytes(jpeg_bytes(120, 100, seed=i, label="normal"))
    (src / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    out = tmp_path / "run"
    args = ["score", str(src), "--model", str(tiny_artifact), "--out", str(out)]
    env = {"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache")}
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="No artists with labels", category=UserWarning)
        result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 0, result.output
    assert "7 images, 6 ok, 1 errors" in result.stdout
    assert (out / "report.html").exists()
    assert pq.read_table(out / "predictions.parquet").num_rows == 7
    # A second run into the same OUT is refused (one line, exit 2) unless --overwrite.
    again = CliRunner().invoke(main, args, env=env)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert CliRunner().invoke(main, [*args, "--overwrite"], env=env).exit_code == 0


@pytest.mark.slow  # a real Ray Train run (~30 s)
def test_train_with_clahe_trains_and_records_it(ray_local, tmp_path):
    from cxr_ray.data.synthetic import write_kermany_folder
    from cxr_ray.models.artifact import read_card

    data = write_kermany_folder(tmp_path / "data", per_class=8, size=(96, 80))
    out = tmp_path / "model"
    args = [
        "train",
        str(data),
        "--out",
        str(out),
        "--intensity",
        "clahe",
        "--epochs",
        "1",
        "--max-steps-per-epoch",
        "1",
        "--input-size",
        "64",
        "--workers",
        "1",
        "--batch-size",
        "4",
        "--no-pretrained",
        "--storage-path",
        str(tmp_path / "runs"),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert read_card(str(out)).intensity == "clahe"


def test_intended_use_is_shown_and_edited_per_artifact(tiny_artifact, tmp_path):
    import shutil

    from cxr_ray.models.artifact import load_artifact

    art = tmp_path / "model"
    shutil.copytree(tiny_artifact, art)
    before = load_artifact(str(art))
    shown = CliRunner().invoke(main, ["intended-use", str(art)])
    assert shown.exit_code == 0, shown.output
    assert "modality CR, DX; body part CHEST; view PA, AP; patient age 0-17 years" in shown.output
    edited = CliRunner().invoke(main, ["intended-use", str(art), "--max-age", "21", "--view", "PA"])
    assert edited.exit_code == 0, edited.output
    after = load_artifact(str(art))  # still loads: the weights hash is unchanged
    assert after.card.version == before.card.version
    assert after.card.intended_use_policy.max_age_years == 21
    assert after.card.intended_use_policy.views == ("PA",)
    bad = CliRunner().invoke(main, ["intended-use", str(art), "--min-age", "30"])
    assert bad.exit_code == 2 and "min_age_years" in bad.output
    assert load_artifact(str(art)).card.intended_use_policy.min_age_years == 0
