"""DIMSE sources (``dicom://AET@HOST:PORT``) against a real Orthanc's DICOM port.

C-FIND lists, C-GET (default) or C-MOVE retrieves; every instance is one row with its pixels
as stored; the filters are the DICOMweb ones; scoring gives the same rows, gating and
identity columns as the DICOMweb source of the same server. Skipped with a reason where
Orthanc is absent.
"""

from __future__ import annotations

import io

import pyarrow.parquet as pq
import pydicom
import pytest

from cxr_ray.config import DicomwebSettings, load_settings
from cxr_ray.data import dimse
from cxr_ray.data.manifest import source_units
from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions
from cxr_ray.errors import DataError
from tests import dicom_factory as factory
from tests.orthanc_server import Orthanc, free_port, running

MOVE_PORT = free_port()


@pytest.fixture(scope="module")
def dicom_server(tmp_path_factory: pytest.TempPathFactory):
    with running(
        tmp_path_factory.mktemp("orthanc-dimse"),
        dicom_port=free_port(),
        dicom_modalities={"cxr": ("CXRRAY", "127.0.0.1", MOVE_PORT)},
    ) as server:
        yield server


@pytest.fixture()
def pacs(dicom_server: Orthanc) -> Orthanc:
    dicom_server.clear()
    return dicom_server


def _options(rows: int = 4, **dw) -> ReadOptions:
    dimse_settings = {"move_port": MOVE_PORT, "connect_timeout_s": 2.0, **dw.pop("dimse", {})}
    settings = DicomwebSettings(retries=1, backoff_s=0.1, dimse=dimse_settings, **dw)
    return ReadOptions(rows_per_block=rows, dicomweb=settings)


def _rows(source: str, options: ReadOptions) -> list[dict]:
    return [r for u in source_units(source, options) for b in read_unit(u, options) for r in b.to_pylist()]


def _sop(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


def test_addresses_parse_and_refuse_anything_else():
    p = dimse.peer("dicom://PACS_1@pacs.example:104")
    assert (p.aet, p.host, p.port, p.source) == (
        "PACS_1",
        "pacs.example",
        104,
        "dicom://PACS_1@pacs.example:104",
    )
    for bad in ("dicom://pacs:104", "dicom://A@pacs", "dicom://A\\B@pacs:104", "dicom://A@pacs:99999"):
        with pytest.raises(DataError):
            dimse.peer(bad)
    uri = dimse.instance_uri(p.source, "1.2", "1.3", "1.4")
    assert dimse.parse_instance_uri(uri) == (p.source, "1.2", "1.3", "1.4")


def test_unreachable_peer_is_a_clear_data_error():
    with pytest.raises(DataError, match="cannot list the studies of dicom://X@"):
        source_units(f"dicom://X@127.0.0.1:{free_port()}", _options())


@pytest.mark.parametrize("retrieve", ["get", "move"])
def test_every_instance_is_one_row_with_its_stored_pixels(pacs, retrieve):
    instances = factory.archive(3, series_per_study=2, with_sr=True)
    factory.upload(instances, pacs)
    rows = _rows(pacs.dimse_source, _options(dimse={"retrieve": retrieve}))
    assert sorted(_sop(r["uri"]) for r in rows) == sorted(i.tags.sop_instance_uid for i in instances)
    assert all(r["error"] is None and r["data"] for r in rows)
    for r in rows:
        got = pydicom.dcmread(io.BytesIO(r["data"]))
        stored = pydicom.dcmread(io.BytesIO(pacs.file_of(_sop(r["uri"]))))
        # As stored: same transfer syntax (no transcoding), same pixel bytes.
        assert got.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
        assert got.get("PixelData") == stored.get("PixelData")
        assert got.SOPInstanceUID == stored.SOPInstanceUID


def test_study_date_and_modality_filters(pacs):
    instances = factory.archive(
        4, series_per_study=1, study_dates=("20261128", "20261130"), modalities=("CR", "DX"), with_sr=True
    )
    factory.upload(instances, pacs)

    def sops(**dw) -> set[str]:
        return {_sop(r.uri) for u in source_units(pacs.dimse_source, _options(**dw)) for r in u.refs}

    def expect(pred) -> set[str]:
        return {i.tags.sop_instance_uid for i in instances if pred(i.tags)}

    assert sops() == expect(lambda t: True)
    assert sops(study_date="20261130") == expect(lambda t: t.study_date == "20261130")
    assert sops(study_date="20261129-") == expect(lambda t: t.study_date >= "20261129")
    assert sops(modalities=("CR",)) == expect(lambda t: t.modality == "CR")


def test_peer_down_during_retrieval_gives_error_rows(pacs):
    instances = factory.archive(2, series_per_study=2)
    factory.upload(instances, pacs)
    options = _options()
    units = source_units(pacs.dimse_source, options)
    pacs.stop()
    try:
        rows = [r for u in units for b in read_unit(u, options) for r in b.to_pylist()]
    finally:
        pacs.start()
    assert len(rows) == len(instances)
    assert all(r["data"] is None and r["error"].startswith("unretrievable: ") for r in rows)
    assert not any(i.tags.sop_instance_uid in r["error"] for r in rows for i in instances)


def test_scoring_dimse_gives_the_dicomweb_rows(pacs, ray_local, tiny_artifact, tmp_path):
    """Same rows, same intended-use gating, same identity columns as the DICOMweb source."""
    from cxr_ray.scoring.pipeline import score

    instances = factory.six_file_case()
    factory.upload(instances, pacs)
    settings = load_settings(
        overrides={"data": {"rows_per_block": 3}, "score": {"cache_dir": str(tmp_path / "cache")}}
    )
    score(pacs.dimse_source, str(tiny_artifact), str(tmp_path / "dimse"), settings)
    score(pacs.source, str(tiny_artifact), str(tmp_path / "web"), settings)
    tables = {k: pq.read_table(tmp_path / k / "predictions.parquet") for k in ("dimse", "web")}
    same = [
        "status",
        "error",
        "study_instance_uid",
        "series_instance_uid",
        "patient_id",
        "accession_number",
        "study_date",
        "view_position",
        "modality",
        "intended_use",
        "pred_label",
    ]
    by_sop = {k: {_sop(r["uri"]): r for r in t.to_pylist()} for k, t in tables.items()}
    assert (
        sorted(by_sop["dimse"]) == sorted(by_sop["web"]) == sorted(i.tags.sop_instance_uid for i in instances)
    )
    for sop, row in by_sop["dimse"].items():
        web = by_sop["web"][sop]
        assert {c: row[c] for c in same} == {c: web[c] for c in same}
        assert row["uri"].startswith("dicom://ORTHANC@127.0.0.1:")
        if row["status"] == "ok":
            assert row["prob_pneumonia"] == pytest.approx(web["prob_pneumonia"], abs=1e-6)
    assert {r["status"] for r in by_sop["dimse"].values()} == {"ok", "skipped"}
