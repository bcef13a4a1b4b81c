"""The three job entrypoints, in-process and through `ray job submit` against a real head."""

from __future__ import annotations

import contextlib
import os
import runpy
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from cxr_ray.data.synthetic import jpeg_bytes, kermany_name
from tests import imaging

REPO = Path(__file__).resolve().parents[1]


def _add_images(root: Path, start: int, n: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        label = ("normal", "bacterial", "viral")[i % 3]
        (root / kermany_name(label, i)).write_bytes(jpeg_bytes(200, 180, seed=1000 + i, label=label))


def _job(module: str, args: list[str], tmp_path: Path, monkeypatch, capsys) -> tuple[int, str, str]:
    """Run ``python -m jobs.<module> ARGS`` in this process (its ``__main__`` block, for real)."""
    monkeypatch.setenv("CXR_SCORE__CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(sys, "argv", [f"jobs/{module}.py", *args])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module(f"jobs.{module}", run_name="__main__")
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_nightly_job_scores_new_images_once(ray_local, tiny_artifact, tmp_path, monkeypatch, capsys):
    archive, root = tmp_path / "archive", tmp_path / "nightly"
    _add_images(archive, 0, 6)
    (archive / "broken.jpeg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    args = [str(archive), "--model", str(tiny_artifact), "--root", str(root)]
    code, first, _ = _job("nightly_score", args, tmp_path, monkeypatch, capsys)
    assert code == 0
    code, again, _ = _job("nightly_score", args, tmp_path, monkeypatch, capsys)
    assert code == 0
    assert "0 new images" in again  # the ledger's layout is the nightly module's to test
    assert "person" not in first + again  # no patient identifiers in job logs


def test_screen_job_ranks_flagged_studies_without_patient_ids(
    ray_local, tiny_artifact, tmp_path, monkeypatch, capsys
):
    from cxr_ray.scoring.studies import STUDIES_SCHEMA
    from tests.conftest import make_artifact

    # Kermany names carry patient ids: person5000 and person5001 have 4 images each, the 4
    # normals one each; threshold 0 flags all 12 readable images, i.e. 6 studies.
    archive = imaging.kermany_folder(tmp_path / "archive", per_class=4)
    (archive / "empty.jpeg").write_bytes(b"")
    model = make_artifact(tmp_path / "model", threshold=0.0)
    out = tmp_path / "s"
    code, stdout, _ = _job(
        "screen_archive",
        [str(archive), "--model", str(model), "--out", str(out), "--top", "3"],
        tmp_path,
        monkeypatch,
        capsys,
    )
    assert code == 0
    preds = pq.read_table(out / "predictions.parquet")
    assert preds.num_rows == 13 and sum(bool(f) for f in preds["flagged"].to_pylist()) == 12
    studies = pq.read_table(out / "studies.parquet")
    flagged = pq.read_table(out / "flagged.parquet")
    assert flagged.schema.equals(STUDIES_SCHEMA, check_metadata=False)
    # One row per flagged study (not per flagged image), most suspicious first.
    keys = flagged["study_key"].to_pylist()
    assert flagged.num_rows == 6 == len(set(keys)) == sum(bool(f) for f in studies["flagged"].to_pylist())
    assert {"person5000", "person5001"} <= set(keys)
    assert flagged.filter(pc.equal(flagged["study_key"], "person5000"))["images"].to_pylist() == [4]
    probs = flagged["prob_pneumonia"].to_pylist()
    assert probs == sorted(probs, reverse=True) and all(flagged["flagged"].to_pylist())
    assert "flagged studies: 6" in stdout and (out / "report.html").exists()
    assert "images: 13 = 12 ok + 0 skipped + 1 errors" in stdout
    assert "studies: 7, by predicted class" in stdout
    by_class = stdout.split("by predicted class (of the driving image): ", 1)[1].splitlines()[0]
    counts = dict(part.split("=") for part in by_class.split(", "))
    assert counts.pop("not scored") == "1" and sum(map(int, counts.values())) == 6
    top = [line.split() for line in stdout.splitlines() if "P(pneumonia)=" in line]
    assert [t[0] for t in top] == [i[:12] for i in flagged["driving_image_id"].to_pylist()[:3]]
    assert [f"{t[3]} {t[4]}" for t in top] == [f"{n} images" for n in flagged["images"].to_pylist()[:3]]
    # Kermany names carry patient ids (person123_...): none may reach the job log or the report.
    report = (out / "report.html").read_text()
    assert "person" not in stdout and "IM-" not in stdout and "person5" not in report


def test_retrain_takes_every_train_option():
    from cxr_ray.cli import main

    out = subprocess.run(
        [sys.executable, "-m", "jobs.retrain", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Usage: python -m jobs.retrain [OPTIONS] DATA"), out.stdout[:200]
    assert "cxr-ray train" not in out.stdout and "--config" in out.stdout and "-v, --verbose" in out.stdout
    for param in main.commands["train"].params:
        for opt in param.opts:
            if opt.startswith("--"):
                assert opt in out.stdout, opt


def test_job_exit_code_2_on_bad_settings(tmp_path):
    env = os.environ | {"CXR_SCORE__ENGINE": "tpu"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.screen_archive",
            str(tmp_path),
            "--model",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "score.engine" in out.stderr and "Traceback" not in out.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head started like a user would (`ray start --head`), stopped on teardown.

    Only this head's processes are stopped (its own process group): `ray stop` would kill
    every Ray on the machine, the test session's own included. Token auth is set the same
    way for the head, the jobs and this client, as Ray 2.60 requires.
    """
    ray_bin = Path(sys.executable).with_name("ray")
    port, dash = _free_port(), _free_port()
    # Every fixed default port gets a free one: the test session's own local Ray already
    # holds the defaults (the dashboard agent's 52365, the client server's 10001), and a
    # head whose agent cannot bind refuses every job ("No available agent to submit job").
    ports = {
        "--dashboard-agent-listen-port": _free_port(),
        "--dashboard-agent-grpc-port": _free_port(),
        "--metrics-export-port": _free_port(),
        "--runtime-env-agent-port": _free_port(),
        "--ray-client-server-port": _free_port(),
    }
    # Token auth as Ray 2.60 sets it up, with a token of this head's own: the client sends it
    # as a header, so neither ~/.ray/auth_token nor this process's cached auth state matters.
    token = secrets.token_hex(32)
    env = os.environ | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}
    # A user starts the head from the activated project environment, so the entrypoint's
    # `python` is the one with cxr-ray's dependencies. `make test` runs .venv/bin/pytest without
    # activating it: put this interpreter's bin first, or `python` is whatever PATH has.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    temp = tmp_path_factory.mktemp("rayhead")
    log_path = temp / "ray_start.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        [
            str(ray_bin),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=true",
            f"--dashboard-port={dash}",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={temp}",
            "--disable-usage-stats",
            *(f"{flag}={p}" for flag, p in ports.items()),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    from ray.job_submission import JobSubmissionClient

    try:
        client, last = None, None
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                client = JobSubmissionClient(
                    f"http://127.0.0.1:{dash}", headers={"Authorization": f"Bearer {token}"}
                )
                client.list_jobs()
                break
            except Exception as exc:
                client, last = None, exc
                time.sleep(1)
        if client is None:
            log.flush()
            pytest.fail(f"the Ray head did not come up: {last!r}\n{log_path.read_text()[-3000:]}")
        yield client
    finally:
        os.killpg(proc.pid, 15)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=15)  # measured: 33 s to exit on its own after its jobs
        # The head's raylet, GCS and agents share its process group; make sure none outlive it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def _submit_and_wait(client, entrypoint: str, timeout: float = 600) -> str:
    from ray.job_submission import JobStatus

    runtime_env = {"working_dir": str(REPO), "env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}}
    # The dashboard answers before the node's job agent registers; until then a submit is
    # refused with "No available agent to submit job, please try again later".
    deadline = time.time() + 120
    while True:
        try:
            job = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env)
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)
    deadline = time.time() + timeout
    status = None
    while time.time() < deadline:
        status = client.get_job_status(job)
        if status in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            break
        time.sleep(1)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    return logs


def test_screen_archive_via_ray_job_submit(ray_head, tiny_artifact, tmp_path):
    archive = imaging.kermany_folder(tmp_path / "archive", per_class=3)
    (archive / "empty.jpeg").write_bytes(b"")
    out = tmp_path / "screen"
    logs = _submit_and_wait(
        ray_head,
        f"python -m jobs.screen_archive {archive} --model {tiny_artifact} --out {out}",
    )
    assert "10 images, 9 ok, 1 errors" in logs and "flagged studies:" in logs
    assert pq.read_table(out / "predictions.parquet").num_rows == 10


def test_nightly_score_via_ray_job_submit(ray_head, tiny_artifact, tmp_path):
    archive = tmp_path / "archive"
    _add_images(archive, 0, 6)
    cmd = f"python -m jobs.nightly_score {archive} --model {tiny_artifact} --root {tmp_path / 'n'}"
    _submit_and_wait(ray_head, cmd)
    _add_images(archive, 6, 2)
    assert "2 new images" in _submit_and_wait(ray_head, cmd)


@pytest.mark.slow
def test_retrain_via_ray_job_submit(ray_head, tmp_path):
    from cxr_ray.data.synthetic import write_kermany_folder

    data = write_kermany_folder(tmp_path / "data", per_class=12, size=(96, 80))
    cfg = tmp_path / "cxr.toml"
    cfg.write_text("[model]\npretrained = false\ninput_size = 64\n[train]\nbatch_size = 4\n")
    logs = _submit_and_wait(
        ray_head,
        f"python -m jobs.retrain --config {cfg} {data} --out {tmp_path / 'model'} "
        f"--epochs 1 --max-steps-per-epoch 2 --storage-path {tmp_path / 'runs'}",
        timeout=900,
    )
    assert "artifact mobilenet_v2-" in logs
    assert (tmp_path / "model" / "model_card.json").exists()
