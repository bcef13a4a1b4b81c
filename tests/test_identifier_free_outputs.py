"""Issue 24, defect 2: no output of a run carries an identifier from the input's names.

A real ``cxr-ray score --pseudonymize`` (a subprocess with its own local Ray, so its whole
console output and Ray's own log files are captured) over a folder named like a patient,
``DOE_JANE_MRN12345``, holding good images, broken files, links and archives and a Parquet
table with broken rows, every name carrying the identifier. Every output file is then
searched for every original identifier: raw bytes of every file in the run folder, every
Parquet cell stringified, the console, and Ray's session logs.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cxr_ray.vocabulary import ERROR_CODES
from tests import imaging

REPO = Path(__file__).resolve().parents[1]
#: The identifiers of the folder, file, member and link names, and the DICOM tags.
IDENTIFIERS = ("DOE", "JANE", "MRN12345", "ACC98765", "/etc/hostname", "/home/")
KEY = "0123456789abcdef0123456789abcdef"


def _dicom(*, pixels: bool) -> tuple[bytes, dict[str, str]]:
    """A DICOM with the patient's name, id, accession and UIDs in its header."""
    import pydicom

    data = imaging.dicom_bytes(64, 64, seed=3) if pixels else imaging.bad_inputs()["noimage.dcm"]
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PatientName, ds.PatientID, ds.AccessionNumber = "DOE^JANE", "MRN12345", "ACC98765"
    ds.StudyInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    if not pixels:  # a CR header without pixels (an SR would be skipped by the intended use)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "CR"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    uids = {
        "study": str(ds.StudyInstanceUID),
        "series": str(ds.SeriesInstanceUID),
        "sop": str(ds.SOPInstanceUID),
    }
    return buf.getvalue(), uids


def _patient_folder(root: Path) -> tuple[int, list[str]]:
    """The hostile folder; returns (entries in it, the DICOM UIDs that must not appear)."""
    root.mkdir(parents=True)
    good = imaging.jpeg_bytes(96, 80, seed=1)
    n = 0
    for i in range(2):
        (root / f"DOE_JANE_MRN12345_{i}.jpeg").write_bytes(imaging.jpeg_bytes(96, 80, seed=i))
        n += 1
    (root / "DOE_JANE_truncated.jpeg").write_bytes(good[: len(good) // 2])
    (root / "JANE_MRN12345_garbage.png").write_bytes(os.urandom(300))
    dicom, uids = _dicom(pixels=True)
    (root / "DOE_JANE_MRN12345_cr.dcm").write_bytes(dicom)
    sr, sr_uids = _dicom(pixels=False)
    (root / "DOE_JANE_MRN12345_sr.dcm").write_bytes(sr)
    os.symlink("/etc/hostname", root / "DOE_JANE_outside.jpeg")
    os.symlink(root / "MRN12345_missing.jpeg", root / "DOE_JANE_dangling.jpeg")
    n += 6
    with zipfile.ZipFile(root / "DOE_JANE_MRN12345_batch.zip", "w") as zf:
        zf.writestr("DOE_JANE/MRN12345_ok.jpeg", good)
        zf.writestr("DOE_JANE/MRN12345_broken.jpeg", b"\xff\xd8\xff\xe0 MRN12345 broken")
        zf.writestr("../DOE_JANE_escape.jpeg", good)
        n += 3
    with tarfile.open(root / "DOE_JANE_MRN12345_batch.tar", "w") as tf:
        for name, data in (
            ("JANE/DOE_ok.jpeg", good),
            ("JANE/DOE_truncated.jpeg", good[:100]),
            ("/abs/DOE_JANE_abs.jpeg", good),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("JANE/DOE_link.jpeg")
        link.type, link.linkname = tarfile.SYMTYPE, "/home/DOE_JANE_MRN12345/secret.jpeg"
        tf.addfile(link)
        n += 4
    (root / "DOE_JANE_MRN12345_broken.zip").write_bytes(b"PK\x03\x04 not a zip DOE_JANE")
    n += 1
    names = ["DOE_JANE_row0.jpeg", "DOE_JANE_row1.jpeg", "MRN12345_row2.jpeg"]
    table = pa.table({"image": pa.array([good, b"JANE DOE garbage", None], pa.binary()), "name": names})
    pq.write_table(table, root / "DOE_JANE_MRN12345_table.parquet")
    n += 3
    return n, [*uids.values(), *sr_uids.values()]


def _strings(value: object) -> list[str]:
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (str(k), *_strings(v))]
    if isinstance(value, list | tuple):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, bytes):
        return [value.decode("latin-1")]
    return [] if value is None else [str(value)]


def _texts(run: Path) -> dict[str, str]:
    """Every file under ``run`` as text (raw bytes) and every Parquet table's cells."""
    out: dict[str, str] = {}
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        out[str(path)] = path.read_bytes().decode("latin-1")
        if path.suffix == ".parquet":
            t = pq.read_table(path)
            cells = [*_strings(t.to_pylist()), str(t.schema)]
            out[f"{path} (cells)"] = "\n".join(cells)
        if path.suffix == ".json":
            out[f"{path} (json)"] = "\n".join(_strings(json.loads(path.read_text())))
    return out


def _run(tmp_path: Path, artifact: Path, request, *, pseudonymize: bool) -> dict:
    """``cxr-ray score`` (then ``cxr-ray report``) over the patient-named folder."""
    src = tmp_path / "DOE_JANE_MRN12345"
    n_in, uids = _patient_folder(src)
    run = tmp_path / "run"
    # Ray's socket paths must stay under 108 bytes: a short folder of its own, removed after.
    raytmp = Path(tempfile.mkdtemp(prefix="cxr-ids-"))
    request.addfinalizer(lambda: shutil.rmtree(raytmp, ignore_errors=True))
    env = os.environ | {
        "RAY_TMPDIR": str(raytmp),
        "RAY_USAGE_STATS_ENABLED": "0",
        "CXR_SCORE__PSEUDONYM_KEY": KEY,
        "CXR_SCORE__CACHE_DIR": str(tmp_path / "cache"),
    }
    args = ["score", str(src), "--model", str(artifact), "--out", str(run)]
    console = ""
    # The report of an unlabelled run is written by `cxr-ray report`.
    for command in ([*args, "--pseudonymize"] if pseudonymize else args, ["report", str(run)]):
        proc = subprocess.run(
            [sys.executable, "-m", "cxr_ray", *command],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=540,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        console += proc.stdout + proc.stderr
    preds = pq.read_table(run / "predictions.parquet")
    assert preds.num_rows == n_in, preds.select(["status", "error"]).to_pylist()
    rows = preds.to_pylist()
    bad = [r for r in rows if r["status"] != "ok"]
    assert len(bad) >= 12, [(r["status"], r["error"]) for r in rows]
    for r in bad:
        assert r["error_code"] in ERROR_CODES and r["error"].startswith(r["error_code"]), r
    codes = {r["error_code"] for r in bad}
    assert {"truncated", "symlink_outside_root", "link_dangling", "unsafe_member", "link_member"} <= codes
    assert {"unreadable_container", "dicom_no_pixels", "null_bytes"} <= codes, codes
    assert all(r["error_code"] is None for r in rows if r["status"] == "ok")
    return {"src": src, "uids": uids, "run": run, "rows": rows, "console": console, "raytmp": raytmp}


def _leaks(texts: dict[str, str], idents: tuple[str, ...]) -> list[tuple[str, str, str]]:
    return [
        (ident, name, text[max(0, text.find(ident) - 120) :][:240])
        for name, text in texts.items()
        for ident in idents
        if ident in text
    ]


def test_a_pseudonymized_run_over_a_patient_named_folder_writes_no_identifier(
    tmp_path, tiny_artifact, request
):
    r = _run(tmp_path, tiny_artifact, request, pseudonymize=True)
    texts = _texts(r["run"]) | {"console": r["console"]}
    logs = [p for p in r["raytmp"].rglob("*") if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt")]
    assert logs, "Ray's session logs were not found"
    texts |= {str(p): p.read_bytes().decode("latin-1") for p in logs}
    assert any(name.endswith("report.html") for name in texts) and any("summary.json" in n for n in texts)
    leaks = _leaks(texts, (*IDENTIFIERS, str(r["src"]), *r["uids"]))
    assert not leaks, "\n".join(map(repr, leaks))


def test_error_texts_of_a_plain_run_carry_no_identifier(tmp_path, tiny_artifact, request):
    """Without --pseudonymize a hospital's own outputs keep uri and patient id (to find the
    image), but no error text, summary or report line quotes a name, path, link or UID."""
    r = _run(tmp_path, tiny_artifact, request, pseudonymize=False)
    assert any(str(r["src"]) in row["uri"] for row in r["rows"])  # the location is kept, in uri
    summary = json.loads((r["run"] / "summary.json").read_text())
    assert summary["error_codes"] and summary["error_examples"]
    page = (r["run"] / "report.html").read_text()
    tables = [
        page.split(f'id="{t}"', 1)[1].split("</table>", 1)[0]
        for t in ("errors", "skipped")
        if f'id="{t}"' in page
    ]
    texts = {
        "error column": "\n".join(str(row["error"]) for row in r["rows"]),
        "summary error_examples": json.dumps(summary["error_examples"]),
        "console error lines": "\n".join(
            ln for ln in r["console"].splitlines() if ln.lstrip().startswith(("error:", "reasons:"))
        ),
        "report error tables": "\n".join(tables),
    }
    assert texts["console error lines"] and texts["report error tables"]
    leaks = _leaks(texts, (*IDENTIFIERS, str(r["src"]), *r["uids"]))
    assert not leaks, "\n".join(map(repr, leaks))


def test_every_reason_code_is_documented():
    page = (REPO / "docs" / "OUTPUTS.md").read_text()
    section = page.split("## Reason codes", 1)[1].split("<!-- BEGIN", 1)[0]
    missing = [c for c in ERROR_CODES if f"| `{c}` |" not in section]
    assert not missing, missing


def test_row_errors_are_coded_and_cut_what_could_identify():
    from cxr_ray.errors import DecodeError, error_code, row_error, row_text, safe_row_error

    assert row_error("truncated", "truncated JPEG (OSError)") == "truncated: truncated JPEG (OSError)"
    assert row_error("too_big", "too_big: file is 9 bytes") == "too_big: file is 9 bytes"
    with pytest.raises(ValueError):
        row_error("made_up_code", "x")
    # A detail that (wrongly) quotes a path, a name, a UID or a value keeps none of them.
    leaky = "cannot open '/data/DOE_JANE/x.jpeg' at /srv/MRN12345 JANE_DOE.dcm 1.2.840.113619.2.55.3 \"DOE\""
    text = row_error("undecodable", leaky)
    assert text.startswith("undecodable: cannot open") and error_code(text) == "undecodable"
    for ident in ("DOE", "JANE", "MRN12345", "/data", "1.2.840"):
        assert ident not in text, (ident, text)
    # Exceptions: ours keep their code across processes; anything else is internal, type only.
    err = pickle.loads(pickle.dumps(DecodeError("corrupt PNG (OSError)", code="undecodable")))
    assert row_text(err) == "undecodable: corrupt PNG (OSError)"
    assert row_text(FileNotFoundError(2, "No such file", "/home/DOE_JANE")) == (
        "internal: unexpected FileNotFoundError"
    )
    # Text not built by row_error is internal, scrubbed; coded text is unchanged.
    assert safe_row_error("boom at /home/DOE_JANE/a.png") == "internal: boom at [...]"
    assert safe_row_error("pixel_budget: 3 frame(s) x 512x512 = 786432 values") == (
        "pixel_budget: 3 frame(s) x 512x512 = 786432 values"
    )
    assert error_code("no code here") == "internal" and error_code(None) is None


def test_pseudonymize_scrubs_every_free_text_column():
    from cxr_ray.scoring.pseudonymize import TEXT_COLUMNS, pseudonymize_table

    leaky = "internal: at '/srv/DOE_JANE/a.dcm' /home/MRN12345 1.2.840.113619.2.55.3.4"
    table = pa.table({c: [leaky, None] for c in TEXT_COLUMNS} | {"error_code": ["internal", None]})
    out = pseudonymize_table(table, KEY.encode())
    assert set(TEXT_COLUMNS) >= {"error", "intended_use_note", "delivery_error"}
    for name in TEXT_COLUMNS:
        text = out.column(name)[0].as_py()
        assert out.column(name)[1].as_py() is None and text.startswith("internal: at")
        for ident in ("DOE", "JANE", "MRN12345", "/srv", "1.2.840"):
            assert ident not in text, (name, text)
    assert out.column("error_code").to_pylist() == ["internal", None]
