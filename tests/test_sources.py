"""Listing and reading: folders, tar, zip, Parquet; hostile entries become error rows."""

import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions, list_source, units_from_uris
from cxr_ray.errors import DataError
from cxr_ray.io import uris
from tests import imaging


def rows(source: str, **opts) -> list[dict]:
    options = ReadOptions(rows_per_block=3, **opts)
    out = []
    for unit in list_source(source, options):
        for block in read_unit(unit, options):
            assert block.num_rows <= 3
            out.extend(block.to_pylist())
    return out


def _tar(folder: Path, out: Path, mode: str = "w") -> Path:
    with tarfile.open(out, mode) as tf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                tf.add(p, arcname=str(p.relative_to(folder)))
    return out


def _zip(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                zf.write(p, arcname=str(p.relative_to(folder)))
    return out


def test_folder_any_depth(xray_folder):
    got = rows(str(xray_folder))
    assert len(got) == 12
    assert all(r["error"] is None and r["data"] for r in got)
    assert {r["name"].split("/")[1] for r in got} == {"NORMAL", "PNEUMONIA"}


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_archives_hold_the_same_bytes_as_the_folder(xray_folder, tmp_path, kind):
    archive = tmp_path / f"a.{kind}"
    if kind == "zip":
        _zip(xray_folder, archive)
    else:
        _tar(xray_folder, archive, "w:gz" if kind == "tar.gz" else "w")
    folder = {r["name"]: r["data"] for r in rows(str(xray_folder))}
    packed = rows(str(archive))
    assert {r["name"]: r["data"] for r in packed} == folder
    assert all(r["uri"].startswith(f"{archive}!/") for r in packed)


def test_archives_inside_a_folder_are_opened(xray_folder, tmp_path):
    root = tmp_path / "mixed"
    root.mkdir()
    _zip(xray_folder, root / "day1.zip")
    (root / "loose.jpeg").write_bytes(imaging.jpeg_bytes(seed=77))
    got = rows(str(root))
    assert len(got) == 13


def test_parquet_source_with_names(xray_folder, tmp_path):
    items = rows(str(xray_folder))
    table = pa.table({"path": [r["name"] for r in items], "image": [r["data"] for r in items]})
    pq.write_table(table, tmp_path / "imgs.parquet", row_group_size=5)
    got = rows(str(tmp_path / "imgs.parquet"))
    assert [r["data"] for r in got] == [r["data"] for r in items]
    assert [r["name"] for r in got] == [r["name"] for r in items]
    assert got[7]["uri"] == f"{tmp_path / 'imgs.parquet'}!/7"


def test_parquet_missing_or_null_bytes_column(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x", b"y"]}), tmp_path / "nocol.parquet")
    got = rows(str(tmp_path / "nocol.parquet"))
    assert len(got) == 2 and all("no image column" in r["error"] for r in got)
    pq.write_table(pa.table({"image": [imaging.jpeg_bytes(), None]}), tmp_path / "nulls.parquet")
    got = rows(str(tmp_path / "nulls.parquet"))
    assert got[0]["error"] is None and "null" in got[1]["error"]


def test_unsafe_archive_members_are_error_rows(tmp_path):
    jpg = imaging.jpeg_bytes()
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/IM-0001-0001.jpeg", jpg)
        zf.writestr("../../etc/evil.jpeg", jpg)
        zf.writestr("/abs/evil.jpeg", jpg)
    t = tmp_path / "evil.tar"
    with tarfile.open(t, "w") as tf:
        for name in ("ok.jpeg", "../escape.jpeg", "/etc/abs.jpeg"):
            info = tarfile.TarInfo(name)
            info.size = len(jpg)
            import io

            tf.addfile(info, io.BytesIO(jpg))
        link = tarfile.TarInfo("link.jpeg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tf.addfile(link)
    for archive, n_bad in ((z, 2), (t, 3)):
        got = rows(str(archive))
        bad = [r for r in got if r["error"]]
        assert len(got) == n_bad + 1 and len(bad) == n_bad
        assert all(r["data"] is None for r in bad)
        assert any("escapes the archive root" in r["error"] for r in bad)
    assert not (tmp_path.parent / "escape.jpeg").exists()


def test_symlinks_escaping_root_and_non_utf8_names(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (root / "good.jpeg").write_bytes(imaging.jpeg_bytes())
    outside = tmp_path / "secret.jpeg"
    outside.write_bytes(imaging.jpeg_bytes(seed=2))
    (root / "escape.jpeg").symlink_to(outside)
    (root / "inside.jpeg").symlink_to(root / "good.jpeg")
    os.mkdir(os.path.join(os.fsencode(root), b"caf\xe9"))
    with open(os.path.join(os.fsencode(root), b"caf\xe9", b"x\xff.jpeg"), "wb") as f:
        f.write(imaging.jpeg_bytes(seed=3))
    got = {r["name"]: r for r in rows(str(root))}
    assert len(got) == 4
    assert got["good.jpeg"]["error"] is None
    assert got["inside.jpeg"]["error"] is None
    assert "outside the source root" in got["escape.jpeg"]["error"]
    bad = [r for n, r in got.items() if "UTF-8" in (r["error"] or "")]
    assert len(bad) == 1 and "\\xe9" in bad[0]["uri"]


def test_broken_archive_is_one_error_row(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "broken.zip").write_bytes(b"PK\x03\x04 not really a zip")
    got = rows(str(tmp_path / "src"))
    assert len(got) == 1 and "cannot open zip archive" in got[0]["error"]


def test_truncated_tar_keeps_every_member(xray_folder, tmp_path):
    tar = _tar(xray_folder, tmp_path / "a.tar")
    options = ReadOptions(rows_per_block=64)
    units = list_source(str(tar), options)
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2])
    got = [r for u in units for b in read_unit(u, options) for r in b.to_pylist()]
    assert len(got) == 12
    assert any(r["error"] and "truncated" in r["error"] for r in got)


def test_units_from_uris_reread_members(xray_folder, tmp_path):
    z = _zip(xray_folder, tmp_path / "a.zip")
    t = _tar(xray_folder, tmp_path / "a.tgz", "w:gz")
    listed = rows(str(z)) + rows(str(t)) + rows(str(xray_folder))
    options = ReadOptions(rows_per_block=4)
    units = units_from_uris([(r["uri"], r["name"], None) for r in listed], 4)
    again = {r["uri"]: r for u in units for b in read_unit(u, options) for r in b.to_pylist()}
    assert {u: r["data"] for u, r in again.items()} == {r["uri"]: r["data"] for r in listed}


def test_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_source(str(tmp_path / "nope"))


def test_uri_helpers():
    assert uris.split_uri("/a/b.zip!/x/y.jpeg") == uris.SplitUri("/a/b.zip", "x/y.jpeg")
    assert uris.split_uri("/a/weird!/name.jpeg") == uris.SplitUri("/a/weird!/name.jpeg", None)
    assert uris.unsafe_member_reason("a/../../b") is not None
    assert uris.unsafe_member_reason("a/b..c/d.jpeg") is None
