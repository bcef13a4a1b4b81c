"""DICOMweb sources against a real Orthanc (skipped with a reason where Orthanc is absent).

DICOMs are generated from the real Kermany images (``tests.dicom_factory``), uploaded to an
Orthanc started on loopback (``tests.orthanc_server``), listed with QIDO-RS and retrieved
with WADO-RS through the source, without Ray and through Ray Data, then scored end to end.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from cxr_ray.config import DicomwebSettings, load_settings
from cxr_ray.data import dicomweb
from cxr_ray.data.manifest import source_dataset, source_units, uri_units, write_manifest
from cxr_ray.data.readers import read_unit
from cxr_ray.data.sources import ReadOptions
from cxr_ray.errors import ConfigError, DataError
from tests import dicom_factory as factory
from tests.orthanc_server import AUTH_PASSWORD, AUTH_USER, Orthanc
from tests.orthanc_server import orthanc as orthanc  # the module-scoped fixtures
from tests.orthanc_server import orthanc_auth as orthanc_auth


def _options(rows: int = 64, **dw) -> ReadOptions:
    # Fast retries: the tests stop Orthanc on purpose.
    # The test Orthanc speaks plain HTTP: credentials there need the explicit opt-in.
    dw = {
        "retries": 5,
        "backoff_s": 0.2,
        "max_backoff_s": 2.0,
        "connect_timeout_s": 2.0,
        "allow_insecure_http": True,
        **dw,
    }
    return ReadOptions(rows_per_block=rows, dicomweb=DicomwebSettings(**dw))


def _read_all(source: str, options: ReadOptions) -> list[dict]:
    return [
        r for unit in source_units(source, options) for b in read_unit(unit, options) for r in b.to_pylist()
    ]


def _sop(uri: str) -> str:
    return uri.rsplit("/", 1)[-1]


@pytest.fixture()
def pacs(orthanc: Orthanc) -> Orthanc:
    """The module's Orthanc, emptied for this test."""
    orthanc.clear()
    return orthanc


# ----------------------------------------------------------------------------- no server needed


def test_source_urls_map_to_http_and_refuse_credentials():
    assert dicomweb.endpoint("dicomweb://pacs:8042/dicom-web/") == dicomweb.Endpoint(
        "dicomweb://pacs:8042/dicom-web", "http://pacs:8042/dicom-web"
    )
    assert (
        dicomweb.endpoint("dicomwebs://pacs.example.org/dicomweb").url == "https://pacs.example.org/dicomweb"
    )
    with pytest.raises(DataError) as exc:
        dicomweb.endpoint("dicomweb://alice:hunter2@pacs:8042/dicom-web")
    assert "hunter2" not in str(exc.value) and "dicomweb.password" in str(exc.value)
    with pytest.raises(DataError, match="query string"):
        dicomweb.endpoint("dicomweb://pacs:8042/dicom-web?StudyDate=20261130")
    uri = dicomweb.instance_uri("dicomweb://pacs:8042/dicom-web", "1.2", "1.2.3", "1.2.3.4")
    assert dicomweb.parse_instance_uri(uri) == ("dicomweb://pacs:8042/dicom-web", "1.2", "1.2.3", "1.2.3.4")


def test_settings_validate_filters_and_hide_secrets(monkeypatch):
    monkeypatch.setenv("CXR_DICOMWEB__MODALITIES", "cr, DX")
    monkeypatch.setenv("CXR_DICOMWEB__USERNAME", "alice")
    monkeypatch.setenv("CXR_DICOMWEB__PASSWORD", "hunter2")
    s = load_settings().dicomweb
    assert s.modalities == ("CR", "DX") and s.password is not None
    assert s.password.get_secret_value() == "hunter2"
    assert "hunter2" not in repr(s) and "hunter2" not in str(s.model_dump(mode="json"))
    for bad in ({"study_date": "2026-11-30"}, {"token": "t", "username": "u"}, {"query": {"limit": "5"}}):
        with pytest.raises(ConfigError):
            load_settings(overrides={"dicomweb": bad})
    assert DicomwebSettings(study_date="20261130-").study_date == "20261130-"


def test_unreachable_server_is_a_clear_data_error():
    from tests.orthanc_server import free_port

    source = f"dicomweb://127.0.0.1:{free_port()}/dicom-web"
    with pytest.raises(DataError, match=r"cannot list the studies.*cannot reach"):
        source_units(source, _options(retries=1, backoff_s=0.01))


# ----------------------------------------------------------------------------- against Orthanc


def test_every_instance_is_one_row_with_the_uploaded_bytes(pacs):
    instances = factory.variants() + factory.six_file_case() + factory.archive(3, with_sr=True)
    factory.upload(instances, pacs)
    options = _options(rows=4, blocks_per_task=2)
    units = source_units(pacs.source, options)
    # Read units of at most 2 blocks of 4, blocks of at most 4 rows.
    assert all(u.kind == "dicomweb" and u.num_rows <= 8 for u in units)
    assert max(u.num_rows for u in units) > 4
    assert all(b.num_rows <= 4 for u in units for b in read_unit(u, options))
    # Whole studies per read unit (the 7-instance variants study is the one split).
    studies_per_unit = Counter(dicomweb.parse_instance_uri(r.uri)[1] for u in units for r in u.refs)
    assert sum(studies_per_unit.values()) == len(instances)
    rows = _read_all(pacs.source, options)
    by_sop = {i.tags.sop_instance_uid: i for i in instances}
    assert len(rows) == len(instances) and {_sop(r["uri"]) for r in rows} == set(by_sop)
    for row in rows:
        assert row["error"] is None, row["error"]
        assert row["data"] == by_sop[_sop(row["uri"])].data  # stored bytes, SR included
        assert row["uri"].startswith(pacs.source + "/studies/")
        assert row["name"] == f"{_sop(row['uri'])}.dcm"


def test_listing_pages_with_limit_and_offset(pacs):
    instances = factory.archive(7, series_per_study=1, instances_per_series=3)
    factory.upload(instances, pacs)
    seen: list[str] = []
    session = requests.Session()
    session.hooks["response"].append(lambda r, *a, **k: seen.append(r.request.url))
    settings = DicomwebSettings(page_size=2)
    client = dicomweb.make_client(pacs.dicomweb_url, settings, session=session)
    studies = dicomweb.list_studies(client, settings)
    assert sorted(studies) == sorted({i.tags.study_instance_uid for i in instances})
    study_queries = [u for u in seen if "/studies?" in u]
    assert len(study_queries) == 4  # 2 + 2 + 2 + 1
    assert all("limit=2" in u for u in study_queries)
    assert [u.split("offset=")[1].split("&")[0] for u in study_queries] == ["0", "2", "4", "6"]
    seen.clear()
    refs = dicomweb.list_study(client, pacs.source, studies[0], settings)
    assert len(refs) == 3 and len(seen) == 2  # 2 + 1 instances
    rows = _read_all(pacs.source, _options(rows=5, page_size=2))
    assert sorted(_sop(r["uri"]) for r in rows) == sorted(i.tags.sop_instance_uid for i in instances)


def test_study_date_modality_and_query_filters(pacs):
    dates = ("20261129", "20261130", "20261201", "20261202")
    instances = factory.archive(8, series_per_study=1, study_dates=dates, modalities=("CR", "DX", "CT", "CR"))
    # A CR study with a CT series too: the modality filter keeps the study, not the CT series.
    mixed = factory.archive(1, series_per_study=1, modalities=("CR",))[0]
    ct = factory.Instance(
        "mixed-ct",
        factory.make_image(
            factory.real_jpegs(1)[0],
            t := dataclasses.replace(
                mixed.tags,
                modality="CT",
                series_instance_uid=factory.new_uid(),
                sop_instance_uid=factory.new_uid(),
                view_position=None,
            ),
        ),
        t,
    )
    factory.upload([*instances, mixed, ct], pacs)

    def sops(**dw) -> set[str]:
        return {_sop(r["uri"]) for r in _read_all(pacs.source, _options(page_size=3, **dw))}

    def expect(pred) -> set[str]:
        return {i.tags.sop_instance_uid for i in [*instances, mixed, ct] if pred(i.tags)}

    assert sops(study_date="20261130-20261201") == expect(lambda t: "20261130" <= t.study_date <= "20261201")
    assert sops(study_date="20261202") == expect(lambda t: t.study_date == "20261202")
    assert sops(modalities=("CR",)) == expect(lambda t: t.modality == "CR")
    assert sops(modalities=("CR", "CT")) == expect(lambda t: t.modality in ("CR", "CT"))
    assert sops(modalities=("DX",), study_date="20261129-20261130") == expect(
        lambda t: t.modality == "DX" and t.study_date <= "20261130"
    )
    one = instances[5].tags.accession_number
    assert sops(query={"AccessionNumber": one}) == expect(lambda t: t.accession_number == one)


def test_basic_auth_success_and_a_wrong_password_is_a_clear_error(orthanc_auth, caplog):
    orthanc_auth.clear()
    instances = factory.archive(2, series_per_study=1)
    factory.upload(instances, orthanc_auth)
    caplog.set_level(logging.DEBUG)
    rows = _read_all(orthanc_auth.source, _options(username=AUTH_USER, password=AUTH_PASSWORD))
    assert len(rows) == 2 and all(r["error"] is None and r["data"] for r in rows)
    for given in ({"username": AUTH_USER, "password": "wrong-password-123"}, {}):
        with pytest.raises(DataError) as exc:
            source_units(orthanc_auth.source, _options(**given))
        message = str(exc.value)
        assert "refused the credentials (HTTP 401)" in message and "dicomweb.password" in message
        assert "wrong-password-123" not in message and AUTH_PASSWORD not in message
    # A token the server does not know is refused the same way.
    with pytest.raises(DataError, match="HTTP 401"):
        source_units(orthanc_auth.source, _options(token="not-a-token"))
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert AUTH_PASSWORD not in logged and "wrong-password-123" not in logged


def test_orthanc_restarted_mid_read_retries_and_loses_nothing(pacs, caplog):
    instances = factory.archive(6, series_per_study=2)
    factory.upload(instances, pacs)
    options = _options(rows=2, blocks_per_task=1)
    units = source_units(pacs.source, options)
    assert len(units) == 6
    caplog.set_level(logging.WARNING, logger="cxr_ray.data.dicomweb")
    rows = [r for b in read_unit(units[0], options) for r in b.to_pylist()]
    pacs.stop()
    restart = threading.Timer(1.0, pacs.start)
    restart.start()
    try:
        for unit in units[1:]:
            rows += [r for b in read_unit(unit, options) for r in b.to_pylist()]
    finally:
        restart.join()
    by_sop = {i.tags.sop_instance_uid: i.data for i in instances}
    assert sorted(_sop(r["uri"]) for r in rows) == sorted(by_sop)  # none lost, none twice
    assert all(r["error"] is None and r["data"] == by_sop[_sop(r["uri"])] for r in rows)
    retries = [r for r in caplog.records if r.name == "cxr_ray.data.dicomweb" and "retry" in r.getMessage()]
    assert retries and "cannot reach the DICOMweb server" in retries[0].getMessage()
    assert not any("1.2." in r.getMessage() for r in caplog.records)  # no UIDs in logs
    assert not any(r.name == "retrying" for r in caplog.records)  # no traceback per request


def test_orthanc_down_for_good_gives_error_rows_not_a_crash(pacs):
    instances = factory.archive(4, series_per_study=2)
    factory.upload(instances, pacs)
    options = _options(rows=2, retries=2, backoff_s=0.05)
    units = source_units(pacs.source, options)
    pacs.stop()
    try:
        t0 = time.monotonic()
        rows = [r for u in units for b in read_unit(u, options) for r in b.to_pylist()]
        took = time.monotonic() - t0
    finally:
        pacs.start()
    assert sorted(_sop(r["uri"]) for r in rows) == sorted(i.tags.sop_instance_uid for i in instances)
    assert all(r["data"] is None and "cannot retrieve the instance: cannot reach" in r["error"] for r in rows)
    assert took < 10  # one backoff sequence per read task, then one attempt per instance


def test_manifest_of_a_dicomweb_source_and_its_re_read(pacs, ray_local, tmp_path):
    instances = factory.six_file_case() + factory.archive(4, series_per_study=2, with_sr=True)
    factory.upload(instances, pacs)
    settings = load_settings(overrides={"data": {"rows_per_block": 3}})
    out = tmp_path / "manifest.parquet"
    summary = write_manifest(pacs.source, str(out), settings.data, DicomwebSettings(page_size=4))
    assert summary.rows == len(instances)
    # The SRs (no pixels) are error rows; every image is ok, with its sha256 id.
    assert summary.status == Counter({"ok": len(instances) - 4, "error": 4})
    table = pq.read_table(out)
    by_sop = {i.tags.sop_instance_uid: i.data for i in instances}
    assert sorted(_sop(u) for u in table.column("uri").to_pylist()) == sorted(by_sop)
    # A manifest of DICOMweb URIs reads again, grouped by study.
    # Only from a configured endpoint (dicomweb.endpoints): others are refused rows.
    configured = DicomwebSettings(endpoints=(pacs.source,))
    units = uri_units(((u, None, None) for u in table.column("uri").to_pylist()), 4, dicomweb=configured)
    assert {u.kind for u in units} == {"dicomweb"}
    again = [r for u in units for b in read_unit(u, _options()) for r in b.to_pylist()]
    assert {r["uri"]: r["data"] for r in again} == {
        u: by_sop[_sop(u)] for u in table.column("uri").to_pylist()
    }


def test_score_dicomweb_with_orthanc_restarted_mid_run(pacs, ray_local, tiny_artifact, tmp_path):
    """End to end through Ray: Orthanc goes away after the first committed block and comes
    back a second later; every instance is still exactly one row (scored, skipped or error)."""
    from cxr_ray.scoring.pipeline import score

    instances = factory.six_file_case() + factory.archive(6, series_per_study=2, with_sr=True)
    factory.upload(instances, pacs)
    settings = load_settings(
        overrides={"data": {"rows_per_block": 2}, "score": {"cache_dir": str(tmp_path / "cache")}}
    )
    restart = threading.Timer(1.0, pacs.start)

    def outage(block: pa.Table) -> None:
        if pacs.proc is not None and not restart.is_alive():
            pacs.stop()
            restart.start()

    try:
        result = score(pacs.source, str(tiny_artifact), str(tmp_path / "out"), settings, on_block=outage)
    finally:
        if restart.is_alive():
            restart.join()
    assert restart.finished.is_set()  # the outage really happened mid-run
    table = pq.read_table(tmp_path / "out" / "predictions.parquet")
    assert result.images == table.num_rows == len(instances)
    uris = table.column("uri").to_pylist()
    assert sorted(_sop(u) for u in uris) == sorted(i.tags.sop_instance_uid for i in instances)
    rows = table.to_pylist()
    assert all(r["status"] in ("ok", "skipped", "error") for r in rows)
    assert all(r["error"] for r in rows if r["status"] == "error")
    # Structured reports are never scored: outside the intended use (Modality SR) once
    # retrieved, or an error row if their retrieval failed during the outage.
    srs = {i.tags.sop_instance_uid for i in instances if i.expect == "error"}
    sr_rows = [r for r in rows if _sop(r["uri"]) in srs]
    assert sr_rows and all(
        r["status"] in ("skipped", "error") and r["prob_pneumonia"] is None for r in sr_rows
    )
    assert all("modality SR" in r["error"] for r in sr_rows if r["status"] == "skipped")


def test_folder_sources_are_unchanged_by_the_dispatch(tmp_path: Path, ray_local):
    # The dispatch leaves ordinary sources alone: generated DICOM files in a folder.
    factory.write_files(factory.six_file_case(), tmp_path / "dcm")
    rows = source_dataset(str(tmp_path / "dcm"), load_settings().data).take_all()
    assert len(rows) == 6 and all(r["data"] for r in rows)
