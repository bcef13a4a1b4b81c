"""Hostile inputs through `score` and `manifest`: every one an error row, never a crash."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from cxr_ray.cli import main
from cxr_ray.errors import DecodeError
from cxr_ray.imaging.preprocess import PreprocessSpec, decode
from tests import imaging

SPEC = PreprocessSpec(height=64, width=64, max_pixels=4_000_000)
PREFIXES = [b"", b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"\0" * 128 + b"DICM", b"GIF89a", b"II*\x00"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=st.sampled_from(PREFIXES), body=st.binary(max_size=4096))
def test_random_bytes_never_crash_the_decoders(prefix, body):
    try:
        d = decode(prefix + body, SPEC, "x.dcm" if b"DICM" in prefix else "x.jpeg")
    except DecodeError as exc:
        assert str(exc)
    else:
        assert d.pixels.shape == (64, 64)


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=4000))
@example(cut=1, flip=136)  # found by this test: a corrupt group length raised BytesLengthException
def test_mutated_real_images_never_crash(cut, flip):
    """Through the scoring decode stage: one row per image in, each ``ok`` with pixels or an
    ``error`` with a message, whatever the mutation (issue 22 item 7: it asserted nothing)."""
    from cxr_ray.data.sources import RAW_SCHEMA
    from cxr_ray.scoring.stages import decode_stage
    from cxr_ray.vocabulary import Status

    mutated = []
    for data in (
        imaging.jpeg_bytes(120, 100, seed=1),
        imaging.png_bytes(120, 100, seed=1),
        imaging.dicom_bytes(64, 64, seed=1),
    ):
        b = bytearray(data[: max(1, len(data) - cut)])
        b[flip % len(b)] ^= 0xFF
        mutated.append(bytes(b))
    n = len(mutated)
    batch = pa.Table.from_pydict(
        {
            "uri": [f"/m/{i}.dcm" for i in range(n)],
            "name": [f"{i}.dcm" for i in range(n)],
            "data": mutated,
            "error": [None] * n,
            "label": [None] * n,
        },
        schema=RAW_SCHEMA,
    )
    out = decode_stage(batch, spec=SPEC)
    assert len(out["status"]) == n  # rows out == images in
    for status, error, decoded in zip(out["status"], out["error"], out["decoded"], strict=True):
        assert status in (Status.OK, Status.ERROR)
        if status == Status.OK:
            assert error is None and decoded
        else:
            assert isinstance(error, str) and error and not decoded
    assert out["pixels"].shape == (n, SPEC.height, SPEC.width)


def hostile_archive(root: Path) -> tuple[Path, int, int]:
    """A folder of every hostile input cxr-ray knows; returns (root, entries, good entries)."""
    root.mkdir(parents=True)
    good = 0
    for i in range(3):
        (root / f"person{i}_virus_{i}.jpeg").write_bytes(imaging.jpeg_bytes(seed=i))
        good += 1
    (root / "scan.dcm").write_bytes(imaging.dicom_bytes(seed=4, photometric="MONOCHROME1"))
    good += 1
    bad = imaging.bad_inputs()
    for name, data in bad.items():
        (root / name).write_bytes(data)
    good += 1  # wrong-extension.png is a valid JPEG
    (root / "truncated.png").write_bytes(imaging.png_bytes()[:300])
    with open(os.path.join(os.fsencode(root), b"caf\xe9.jpeg"), "wb") as f:
        f.write(imaging.jpeg_bytes(seed=9))
    outside = root.parent / "outside.jpeg"
    outside.write_bytes(imaging.jpeg_bytes(seed=8))
    (root / "escape.jpeg").symlink_to(outside)
    jpg = imaging.jpeg_bytes(seed=7)
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("ok/IM-0001-0001.jpeg", jpg)
        zf.writestr("../../evil.jpeg", jpg)
        zf.writestr("/etc/abs.jpeg", jpg)
    good += 1
    with tarfile.open(root / "evil.tar", "w") as tf:
        for name in ("fine.jpeg", "../up.jpeg", "/abs.jpeg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            tf.addfile(info, io.BytesIO(jpg))
        link = tarfile.TarInfo("link.jpeg")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tf.addfile(link)
    good += 1
    pq.write_table(pa.table({"pixels": [b"x", b"y"]}), root / "nobytes.parquet")
    pq.write_table(pa.table({"image": [jpg, None], "path": ["a.jpeg", "b.jpeg"]}), root / "nulls.parquet")
    good += 1
    entries = 3 + 1 + len(bad) + 1 + 1 + 1 + 3 + 4 + 2 + 2
    return root, entries, good


@pytest.mark.parametrize("command", ["manifest", "score"])
def test_hostile_archive_gives_error_rows_and_exit_0(ray_local, tiny_artifact, tmp_path, command):
    root, entries, good = hostile_archive(tmp_path / "in")
    out = tmp_path / "out"
    if command == "manifest":
        args = ["manifest", str(root), "--out", str(out / "m.parquet")]
        table = out / "m.parquet"
    else:
        args = ["score", str(root), "--model", str(tiny_artifact), "--out", str(out)]
        table = out / "predictions.parquet"
    result = CliRunner().invoke(main, args, env={"CXR_SCORE__CACHE_DIR": str(tmp_path / "c")})
    assert result.exit_code == 0, result.output
    t = pq.read_table(table)
    assert t.num_rows == entries  # rows out == entries in
    status = Counter(t["status"].to_pylist())
    if command == "score":  # the structured report (Modality SR) is outside the intended use
        assert status == {"ok": good, "error": entries - good - 1, "skipped": 1}
    else:  # the manifest lists and checks files: an SR has no pixel data, an error row
        assert status == {"ok": good, "error": entries - good}
    errors = [e for e in t["error"].to_pylist() if e]
    for needle in (
        "empty file",
        "truncated",
        "decompression bomb",
        "unsupported format",
        "UTF-8",
        "outside the source root",
        "escapes the archive root",
        "absolute path",
        "refusing to follow",
        "no image column",
        "null in bytes column",
        "DICOM",
    ):
        assert any(needle in e for e in errors), needle
    assert not (tmp_path / "evil.jpeg").exists() and not (tmp_path / "up.jpeg").exists()


@pytest.mark.parametrize(
    ("args", "env", "needle"),
    [
        (["train", "DATA", "--out", "o", "--workers", "-1"], {}, "train.workers"),
        (["score", "DATA", "--model", "M", "--out", "o", "--engine", "tpu"], {}, "score.engine"),
        (["score", "DATA", "--model", "M", "--out", "o", "--batch-size", "0"], {}, "score.batch_size"),
        (["train", "DATA", "--out", "o", "--storage-path", "s3://"], {}, "train.storage_path"),
        (["train", "DATA", "--out", "o", "--storage-path", "s3:/bucket/x"], {}, "malformed URI"),
        (["manifest", "DATA", "--out", "m.parquet"], {"CXR_DATA__MAX_PIXELS": "lots"}, "data.max_pixels"),
        (["score", "/no/such/dir", "--model", "MODEL", "--out", "o"], {}, "does not exist"),
        (
            ["score", "DATA", "--model", "/no/such/model", "--out", "o"],
            {},
            "model artifact '/no/such/model' does",
        ),
        (["score", "DATA", "--model", "DATA", "--out", "o"], {}, "not a cxr-ray model artifact"),
        (["manifest", "/no/such/dir", "--out", "m.parquet"], {}, "does not exist"),
        (["evaluate", "/no/such.parquet"], {}, "does not exist"),
        (["--config", "/no/such.toml", "manifest", "DATA", "--out", "m.parquet"], {}, "does not exist"),
    ],
)
def test_invalid_settings_and_paths_one_line_exit_2(ray_local, tiny_artifact, tmp_path, args, env, needle):
    data = imaging.kermany_folder(tmp_path / "data", per_class=1)
    args = [
        str(data)
        if a == "DATA"
        else str(tiny_artifact)
        if a == "MODEL"
        else str(tmp_path / a)
        if a in ("o", "m.parquet")
        else a
        for a in args
    ]
    result = CliRunner().invoke(main, args, env=env)
    assert result.exit_code == 2, result.output
    assert needle in result.output
    assert "Traceback" not in result.output
    # One actionable line (settings errors list one line per invalid field).
    assert len([line for line in result.output.splitlines() if line.strip()]) <= 2
