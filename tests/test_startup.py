"""Start-up of a scoring run: no Ray error line an operator would read as a failure."""

from __future__ import annotations

import os
import time

from click.testing import CliRunner

from cxr_ray.cli import main
from cxr_ray.cli.runtime import RAY_NOISE, filtered_stderr
from cxr_ray.data.synthetic import jpeg_bytes

#: What Ray core logs for every Ray Data actor-pool actor (ray-project/ray#53727).
CORE_WORKER_LINE = "has constructor arguments in the object store and max_restarts > 0"


def test_a_real_score_prints_no_core_worker_line(ray_local, tiny_artifact, tmp_path, capfd):
    """Ray core writes the line from C++ straight to fd 2 when the predictor pool's actor is
    created: capfd sees it (a CliRunner's captured stderr would not)."""
    src = tmp_path / "images"
    src.mkdir()
    for i in range(3):
        (src / f"img_{i}.jpeg").write_bytes(jpeg_bytes(96, 80, seed=i))
    args = ["score", str(src), "--model", str(tiny_artifact), "--out", str(tmp_path / "run")]
    result = CliRunner().invoke(main, args, env={"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache")})
    assert result.exit_code == 0, result.output
    assert "3 images, 3 ok" in result.stdout
    time.sleep(0.5)  # Ray's C++ logger flushes on its own thread
    captured = capfd.readouterr()
    seen = captured.out + captured.err + result.output
    assert CORE_WORKER_LINE not in seen, seen[-2000:]


def test_the_filter_drops_only_the_noise_and_passes_the_rest_at_once(capfd):
    noise = b"[2026-01-01 00:00:00,000 E 1 1] core_worker.cc:2465: Actor with class name: 'X' " + RAY_NOISE[0]
    with filtered_stderr():
        os.write(2, b"[2026-01-01 00:00:00,000 W 1 1] raylet.cc:1: a real warning\n")
        os.write(2, noise + b". See ...\n")
        os.write(2, b"\rscoring: 5 img")  # a progress redraw: no newline, passed on at once
        time.sleep(0.2)
        assert capfd.readouterr().err.endswith("\rscoring: 5 img")
        os.write(2, b"\n[partial Ray line")  # held until its end or the block's end
    err = capfd.readouterr().err
    assert "a real warning" not in err  # read above already
    assert err.endswith("[partial Ray line") and CORE_WORKER_LINE not in err
    # fd 2 is the real stderr again
    os.write(2, noise + b"\n")
    assert CORE_WORKER_LINE in capfd.readouterr().err


def test_the_filter_keeps_a_real_warning(capfd):
    with filtered_stderr():
        os.write(2, b"[2026-01-01 00:00:00,000 W 1 1] raylet.cc:1: a real warning\n")
    assert "a real warning" in capfd.readouterr().err
