"""Ray Train fine-tuning: DDP equivalence, real failure and resume, artifacts."""

from __future__ import annotations

import os
import re
import signal
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cxr_ray.config import load_settings
from cxr_ray.data.synthetic import write_kermany_folder
from cxr_ray.models.artifact import load_artifact
from cxr_ray.models.factory import create_model
from cxr_ray.training import loop, recipe
from cxr_ray.training.checkpoint import load_state


def _fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 1, 32, 32, generator=g), torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])


def _one_step(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    # Eval mode (gradients still flow): BatchNorm batch statistics are per worker under DDP
    # and dropout masks are random; the equivalence under test is gradient averaging.
    net.eval()
    loop.train_step(
        net, x, y, opt, weights=recipe.class_weights([1, 2, 3]), label_smoothing=0.1, grad_clip=0.0
    )


def _ddp_step_worker(config: dict) -> None:
    import ray.train

    torch.manual_seed(0)
    net = create_model("mobilenet_v2", pretrained=False)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    x, y = _fixed_batch()
    shard = slice(rank * len(y) // world, (rank + 1) * len(y) // world)
    net = ray.train.torch.prepare_model(net)
    _one_step(net, x[shard], y[shard])
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = None
        if rank == 0:
            torch.save(net.module.state_dict(), Path(tmp) / "w.pt")
            ckpt = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report({"done": 1}, checkpoint=ckpt)


def test_ddp_step_with_2_workers_equals_1_worker_on_the_concatenated_batch(ray_local, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    result = TorchTrainer(
        _ddp_step_worker,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="ddp-eq", storage_path=str(tmp_path)),
    ).fit()
    with result.checkpoint.as_directory() as d:
        ddp = torch.load(Path(d) / "w.pt", weights_only=True)

    torch.manual_seed(0)
    single = create_model("mobilenet_v2", pretrained=False)
    before = {k: v.clone() for k, v in single.state_dict().items()}
    _one_step(single, *_fixed_batch())
    changed = 0
    for k, v in single.state_dict().items():
        assert torch.allclose(ddp[k], v, rtol=1e-4, atol=1e-7), k
        changed += int(not torch.equal(v, before[k]))
    assert changed >= 80  # the step really moved (nearly) every weight tensor


def test_recipe_pieces():
    f = recipe.warmup_cosine(10, 110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5) and f(110) == pytest.approx(0.0)
    w = recipe.class_weights([100, 300, 100])
    assert torch.allclose(w, torch.tensor([5 / 3, 5 / 9, 5 / 3]))
    net = create_model("mobilenet_v2", pretrained=False)
    frozen = recipe.freeze_blocks(net, "mobilenet_v2", 4)
    assert len(frozen) == 4 and not any(p.requires_grad for b in frozen for p in b.parameters())
    groups = recipe.param_groups(net, "mobilenet_v2", lr=1.0, backbone_lr_mult=0.1, weight_decay=0.5)
    head = [g for g in groups if g["lr"] == 1.0]
    assert sum(p.numel() for g in head for p in g["params"]) == 1280 * 3 + 3
    assert all(g["weight_decay"] == 0 for g in groups if all(p.ndim == 1 for p in g["params"]))


def test_precision_resolution_and_cpu_bf16_autocast(monkeypatch):
    cpu = torch.device("cpu")
    native = loop.cpu_bf16_native()
    assert loop.resolve_precision(cpu, "auto") == ("bf16" if native else "fp32")
    assert loop.resolve_precision(cpu, "fp32") == "fp32"
    assert loop.resolve_precision(cpu, "bf16") == "bf16"
    assert loop.resolve_precision(cpu, "fp16") == "fp32"  # no fp16 autocast on CPUs
    # Without native bf16 (emulated: slower than fp32), auto trains in fp32.
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert loop.resolve_precision(cpu, "auto") == "fp32"
    monkeypatch.undo()
    conv = torch.nn.Conv2d(1, 4, 3)
    x = torch.rand(2, 1, 8, 8)
    with loop.autocast(cpu, "bf16"):
        assert conv(x).dtype == torch.bfloat16  # the convolutions really run in bf16
    with loop.autocast(cpu, "fp32"):
        assert conv(x).dtype == torch.float32
    # A bf16 step updates the fp32 master weights (autocast never changes parameter dtypes).
    net = create_model("mobilenet_v2", pretrained=False)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    before = net.backbone.classifier[1].weight.detach().clone()
    loss = loop.train_step(net, torch.rand(4, 1, 64, 64), torch.tensor([0, 1, 2, 0]), opt, precision="bf16")
    assert np.isfinite(loss) and net.backbone.classifier[1].weight.dtype == torch.float32
    assert not torch.equal(before, net.backbone.classifier[1].weight)


def test_rng_state_roundtrip_through_weights_only_checkpoint(tmp_path):
    loop.seed_everything(3)
    state = loop.rng_state()
    torch.save({"rng": state}, tmp_path / "s.pt")
    expected = (np.random.rand(), torch.rand(1).item())
    loop.seed_everything(99)
    loop.set_rng_state(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert (np.random.rand(), torch.rand(1).item()) == expected


def test_best_checkpoint_is_the_kept_one_with_the_highest_val_macro_f1(tmp_path):
    from ray.train import Checkpoint, Result

    from cxr_ray.training.finalize import best_checkpoint

    def ckpt(name: str) -> Checkpoint:
        (tmp_path / name).mkdir()
        return Checkpoint.from_directory(str(tmp_path / name))

    kept = [(ckpt("e0"), {"epoch": 0, "val_macro_f1": 0.4}), (ckpt("e2"), {"epoch": 2, "val_macro_f1": 0.7})]
    kept += [(ckpt("e1"), {"epoch": 1, "val_macro_f1": 0.6}), (ckpt("e3"), {"epoch": 3})]  # e3: no metric
    result = Result(metrics={}, checkpoint=kept[-1][0], error=None, path=str(tmp_path), best_checkpoints=kept)
    assert best_checkpoint(result).path == str(tmp_path / "e2")
    with pytest.raises(RuntimeError, match="no checkpoint"):
        best_checkpoint(
            Result(metrics={}, checkpoint=None, error=None, path=str(tmp_path), best_checkpoints=[])
        )


def _settings(tmp_path: Path, **train):
    return load_settings(
        None,
        {
            "model": {"pretrained": False, "input_size": 64},
            "train": {
                "epochs": 3,
                "batch_size": 8,
                "storage_path": str(tmp_path / "runs"),
                "run_name": "t",
                "early_stopping_patience": 5,
                **train,
            },
            "data": {"val_fraction": 0.2},
        },
    )


def _check_history(card, storage: Path, run_name: str = "t") -> list[dict]:
    """The card's history is the whole run, agrees with Ray's books and names the best epoch."""
    from ray.train import Result

    history = card.training["history"]
    assert [h["epoch"] for h in history] == list(range(len(history)))  # one row per epoch, in order
    assert card.training["epochs_run"] == len(history)
    # Ray keeps the reports of the checkpoints it kept (Result.metrics_dataframe): each matches
    # our row for its epoch, and the artifact was built from the best of them.
    ray_rows = Result.from_path(str(storage / run_name)).metrics_dataframe.to_dict("records")
    assert ray_rows
    for row in ray_rows:
        ours = history[int(row["epoch"])]
        assert {k: row[k] for k in ours} == pytest.approx(ours)
    best = card.training["best_epoch"]
    assert history[best]["val_macro_f1"] == max(h["val_macro_f1"] for h in history)
    return history


@pytest.fixture(scope="module")
def synthetic_data(tmp_path_factory) -> Path:
    return write_kermany_folder(tmp_path_factory.mktemp("syn") / "data", per_class=24, size=(96, 80))


def test_train_writes_a_complete_artifact(ray_local, synthetic_data, tmp_path):
    from cxr_ray.training.trainer import train

    s = _settings(tmp_path, epochs=2)
    card = train(s, str(synthetic_data), str(tmp_path / "model"))
    art = load_artifact(str(tmp_path / "model"))
    assert art.card == card
    assert card.input_size == (64, 64)
    assert len(_check_history(card, tmp_path / "runs")) == 2
    # Each epoch records the precision it trained in: bf16 autocast where this CPU has it.
    resolved = loop.resolve_precision(torch.device("cpu"), "auto")
    assert {h["precision"] for h in card.training["history"]} == {resolved}
    assert card.training["data_fingerprint"] and card.training["split_counts"]["val"]
    assert 0 < card.thresholds["pneumonia"] < 1 and card.temperature > 0
    vm = pq.read_table(tmp_path / "model" / "val_metrics.parquet").to_pylist()
    names = {(r["metric"], r["label"]) for r in vm}
    for label in ("normal", "bacterial", "viral"):
        for metric in ("precision", "recall", "f1", "support", "auroc"):
            assert (metric, label) in names
    assert ("confusion_pred_viral", "normal") in names and ("ece_uncalibrated", None) in names
    assert (tmp_path / "model" / "training_curve.png").read_bytes()[:4] == b"\x89PNG"
    split = pq.read_table(tmp_path / "model" / "split.parquet")
    assert set(split["split"].to_pylist()) == {"train", "val"} and split.num_rows == 72
    from cxr_ray.models.outputs import int8_calibration_images

    calib = int8_calibration_images(art, 8)  # INT8 calibration: train images only
    assert calib.shape == (8, 64, 64) and calib.dtype == np.uint8
    md = (tmp_path / "model" / "model_card.md").read_text()
    assert "95% bootstrap" in md and "## Limitations" in md and card.version in md
    assert re.search(r"\| 3-class accuracy \| [0-9.]+ \([0-9.]+-[0-9.]+\) \|", md)


def train_worker_pids() -> list[int]:
    """PIDs of this test session's live Ray Train workers (titled ``ray::RayTrainWorker...``).

    Only descendants of this process (the local Ray that ``ray_local`` started): other Ray
    clusters on the same machine are left alone.
    """
    import psutil

    pids = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmd = " ".join(proc.cmdline())
        except psutil.Error:
            continue  # exited meanwhile
        if cmd.startswith("ray::RayTrainWorker"):
            pids.append(proc.pid)
    return pids


def _registered_checkpoints(storage: Path) -> int:
    """Checkpoints the Ray Train controller has registered (not merely uploaded)."""
    import json

    for snap in storage.glob("*/checkpoint_manager_snapshot.json"):
        try:
            return len(json.loads(snap.read_text())["checkpoint_results"])
        except (ValueError, KeyError):
            return 0  # being rewritten
    return 0


def _kill_a_worker_after_first_checkpoint(storage: Path, done: threading.Event) -> list[int]:
    deadline = time.time() + 300
    while time.time() < deadline and not done.is_set():
        if _registered_checkpoints(storage) >= 1:
            pids = train_worker_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                return [pids[-1]]
        time.sleep(0.05)
    return []


@pytest.mark.slow  # ~65 s each: the slow tier (CI runs it) keeps the default tier near 15 min
def test_worker_killed_mid_run_resumes_from_checkpoint(ray_local, synthetic_data, tmp_path):
    from cxr_ray.training.trainer import train

    # Bigger inputs make an epoch last long enough to kill a worker inside the second one.
    s = _settings(tmp_path, epochs=3, max_failures=1)
    s = load_settings(None, s.model_dump(mode="json") | {"model": {"pretrained": False, "input_size": 160}})
    done = threading.Event()
    killed: list[int] = []
    killer = threading.Thread(
        target=lambda: killed.extend(_kill_a_worker_after_first_checkpoint(tmp_path / "runs", done))
    )
    killer.start()
    try:
        card = train(s, str(synthetic_data), str(tmp_path / "model"))
    finally:
        done.set()
        killer.join()
    assert killed, "no worker was killed"
    history = _check_history(card, tmp_path / "runs")
    assert [h["epoch"] for h in history] == [0, 1, 2]
    # The restarted worker group continued from the checkpoint instead of starting over.
    assert max(h["attempt_start_epoch"] for h in history) >= 1
    assert load_artifact(str(tmp_path / "model")).card.version == card.version


@pytest.mark.slow  # ~65 s each: the slow tier (CI runs it) keeps the default tier near 15 min
def test_driver_restart_with_same_run_name_resumes(ray_local, synthetic_data, tmp_path):
    from cxr_ray.training.trainer import train

    train(_settings(tmp_path, epochs=1), str(synthetic_data), str(tmp_path / "m1"))
    first = load_artifact(str(tmp_path / "m1")).card.training["history"]
    card = train(_settings(tmp_path, epochs=2), str(synthetic_data), str(tmp_path / "m2"))
    history = _check_history(card, tmp_path / "runs")
    assert [h["epoch"] for h in history] == [0, 1]
    assert history[1]["attempt_start_epoch"] == 1
    assert history[0] == first[0]  # epoch 0 came from the first run's checkpoint, not a re-run


def test_checkpoint_state_is_weights_only_loadable(ray_local, synthetic_data, tmp_path):
    from cxr_ray.training.trainer import train

    train(_settings(tmp_path, epochs=1), str(synthetic_data), str(tmp_path / "m"))
    # Only the checkpoint directories (Ray also writes checkpoint_manager_snapshot.json there).
    ckpts = sorted(p for p in (tmp_path / "runs").glob("**/checkpoint_*") if p.is_dir())
    assert ckpts
    state = load_state(ckpts[-1])
    assert {"model", "optimizer", "scheduler", "epoch", "rng", "history"} <= set(state)


def test_image_broken_after_the_manifest_is_left_out_of_training_with_a_warning(
    ray_local, synthetic_data, tmp_path, caplog
):
    import logging
    import shutil

    import pyarrow.compute as pc

    from cxr_ray.training.data import load_split_table, prepare

    data = shutil.copytree(synthetic_data, tmp_path / "data")
    s = _settings(tmp_path)
    table = load_split_table(str(data), s)
    pq.write_table(table, tmp_path / "split.parquet")
    train = table.filter(pc.equal(table["split"], "train"))
    val_rows = table.num_rows - train.num_rows
    broken = train.column("uri").to_pylist()[0]
    Path(broken.removeprefix("file://")).write_bytes(b"\xff\xd8\xff\xe0 truncated")

    with caplog.at_level(logging.WARNING, logger="cxr_ray.training.data"):
        td = prepare(str(tmp_path / "split.parquet"), s)
    assert td.train.count() == train.num_rows - 1
    assert td.val.count() == val_rows
    assert set(np.unique(td.train.to_pandas()["label"])) <= {0, 1, 2}
    assert "1 train images could not be decoded now and are left out" in caplog.text
