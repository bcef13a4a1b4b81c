"""Manifests through the real Ray Data pipeline and the CLI."""

import os
import tarfile
import zipfile
from collections import Counter

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cxr_ray.cli import main
from cxr_ray.config import DataSettings
from cxr_ray.data.manifest import MANIFEST_SCHEMA, read_manifest, write_manifest
from tests import imaging


def _manifest(source, tmp_path, name="m.parquet"):
    out = tmp_path / name
    write_manifest(str(source), str(out), DataSettings(rows_per_block=5))
    return pq.read_table(out)


@pytest.mark.data
def test_real_kermany_manifest(kermany_manifest):
    t = kermany_manifest
    assert t.num_rows == 5216
    assert Counter(t.column("status").to_pylist()) == {"ok": 5216}
    assert Counter(t.column("label").to_pylist()) == {
        "normal": 1341,
        "bacterial": 2530,
        "viral": 1345,
    }
    rows = t.to_pylist()
    assert all(r["patient_id"] for r in rows if r["label"] != "normal")
    assert all(r["width"] == r["height"] == 224 and r["format"] == "jpeg" for r in rows)
    # image_id is the sha256 of the bytes: the release holds 24 byte-identical pairs/triples
    # (always the same patient), so a few ids repeat.
    assert 5180 <= len({r["image_id"] for r in rows}) < 5216


def test_bad_inputs_become_error_rows_and_exit_0(ray_local, tmp_path):
    root = tmp_path / "incoming"
    imaging.kermany_folder(root, per_class=2)
    for name, data in imaging.bad_inputs().items():
        (root / name).write_bytes(data)
    with open(os.path.join(os.fsencode(root), b"bad-\xff-name.jpeg"), "wb") as f:
        f.write(imaging.jpeg_bytes(seed=5))
    with zipfile.ZipFile(root / "evil.zip", "w") as zf:
        zf.writestr("../escape.jpeg", imaging.jpeg_bytes(seed=6))
    (root / "scan.dcm").write_bytes(imaging.dicom_bytes(seed=7))
    out = tmp_path / "m.parquet"
    result = CliRunner().invoke(main, ["manifest", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    t = pq.read_table(out)
    assert t.schema.equals(MANIFEST_SCHEMA)
    n_files = 6 + len(imaging.bad_inputs()) + 1 + 1 + 1
    assert t.num_rows == n_files  # rows out == entries in
    by_name = {r["uri"].rsplit("/", 1)[-1]: r for r in t.to_pylist()}
    ok = {n for n, r in by_name.items() if r["status"] == "ok"}
    assert ok == {n for n in by_name if n.startswith(("IM-", "NORMAL2", "person"))} | {
        "wrong-extension.png",
        "scan.dcm",
    }
    for name in (
        "empty.jpeg",
        "truncated.jpeg",
        ".DS_Store",
        "notes.txt",
        "bomb.png",
        "broken.dcm",
    ):
        assert by_name[name]["status"] == "error" and by_name[name]["error"], name
    assert by_name["empty.jpeg"]["image_id"] is not None  # bytes were read: still identified
    assert "UTF-8" in by_name["bad-\\xff-name.jpeg"]["error"]
    assert "escapes the archive root" in by_name["escape.jpeg"]["error"]
    assert by_name["scan.dcm"]["format"] == "dicom"
    assert "status=ok: 8" in result.output
    assert f"status=error: {n_files - 8}" in result.output


def test_tar_zip_and_folder_give_the_same_image_ids(ray_local, xray_folder, tmp_path):
    with tarfile.open(tmp_path / "x.tar.gz", "w:gz") as tf:
        tf.add(xray_folder, arcname=".")
    with zipfile.ZipFile(tmp_path / "x.zip", "w") as zf:
        for p in xray_folder.rglob("*.jpeg"):
            zf.write(p, arcname=str(p.relative_to(xray_folder)))

    def ids(t):
        return sorted(
            zip(
                t.column("image_id").to_pylist(),
                t.column("label").to_pylist(),
                t.column("patient_id").to_pylist(),
                strict=True,
            )
        )

    folder = _manifest(xray_folder, tmp_path, "f.parquet")
    assert folder.num_rows == 12
    assert ids(_manifest(tmp_path / "x.tar.gz", tmp_path, "t.parquet")) == ids(folder)
    assert ids(_manifest(tmp_path / "x.zip", tmp_path, "z.parquet")) == ids(folder)


def test_read_manifest_rejects_other_tables(tmp_path):
    import pyarrow as pa

    from cxr_ray.errors import DataError

    pq.write_table(pa.table({"a": [1]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="not a cxr-ray manifest"):
        read_manifest(str(tmp_path / "x.parquet"))
    with pytest.raises(DataError, match="does not exist"):
        read_manifest(str(tmp_path / "missing.parquet"))
