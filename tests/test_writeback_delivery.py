"""Delivery of results to a real Orthanc: STOW-RS, C-STORE, and the nightly re-delivery.

Issue 23's acceptance: scoring studies from Orthanc with ``--results-to`` its own DICOMweb
endpoint leaves one SR per assessed study and one secondary capture per flagged study in
Orthanc, in the source study, and running it again adds none; the same through DIMSE only
(C-FIND/C-GET source, C-STORE results); a delivery that fails (server down) is
``delivery=error`` and the next nightly run delivers it, exactly once. Orthanc runs on
loopback (``tests.orthanc_server``) with its DICOM port on a free port and our AE title
registered; skipped with a reason where Orthanc is absent.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import requests
from click.testing import CliRunner

from cxr_ray.cli import main
from cxr_ray.config import load_settings
from cxr_ray.errors import ConfigError
from tests import dicom_factory as factory
from tests.orthanc_server import Orthanc, free_port, running

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
_FAST = {
    "CXR_DICOMWEB__RETRIES": "1",
    "CXR_DICOMWEB__BACKOFF_S": "0.1",
    "CXR_DICOMWEB__CONNECT_TIMEOUT_S": "2",
    "CXR_DICOMWEB__DIMSE__CONNECT_TIMEOUT_S": "2",
}


@pytest.fixture(scope="module")
def pacs_server(tmp_path_factory: pytest.TempPathFactory):
    """Orthanc with DICOMweb and its DICOM port (our AE title CXRRAY registered)."""
    with running(
        tmp_path_factory.mktemp("orthanc-wb"),
        dicom_port=free_port(),
        dicom_modalities={"cxr": ("CXRRAY", "127.0.0.1", free_port())},
    ) as server:
        yield server


@pytest.fixture()
def pacs(pacs_server: Orthanc) -> Orthanc:
    pacs_server.clear()
    return pacs_server


def _cases() -> list[factory.Instance]:
    # 5 studies of the six files (2 in the intended use) + 2 in-scope studies, each
    # patient with its own name, birth date and referring physician, each study its StudyID.
    return [_with_demographics(i) for i in factory.six_file_case() + factory.archive(2, series_per_study=1)]


#: Patient / study attributes the predictions table does not keep: the delivered objects get
#: them from the PACS (QIDO-RS or C-FIND of the study), equal to the source's.
_DEMOGRAPHICS = {
    "PatientName": "00100010",
    "PatientBirthDate": "00100030",
    "StudyTime": "00080030",
    "StudyID": "00200010",
    "ReferringPhysicianName": "00080090",
}


def _demographics(patient_id: str, study_uid: str) -> dict[str, str]:
    k = sum(map(ord, patient_id)) % 9
    return {
        "PatientName": f"DEMO^PATIENT{k}^{patient_id[-3:]}",
        "PatientBirthDate": f"2022010{k + 1}",
        "StudyTime": "081500",
        "StudyID": f"S{sum(map(ord, study_uid)) % 10000}",
        "ReferringPhysicianName": f"REF^DOCTOR{k}",
    }


def _with_demographics(inst: factory.Instance) -> factory.Instance:
    import io

    import pydicom

    ds = pydicom.dcmread(io.BytesIO(inst.data))
    for keyword, value in _demographics(inst.tags.patient_id, inst.tags.study_instance_uid).items():
        setattr(ds, keyword, value)
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return dataclasses.replace(inst, data=out.getvalue())


def _value(meta: dict, tag: str) -> str:
    value = (meta.get(tag, {}).get("Value") or [""])[0]
    return value.get("Alphabetic", "") if isinstance(value, dict) else str(value)


def _check_demographics(server: Orthanc, instances: list[factory.Instance]) -> None:
    """Every SR and OT instance carries its source study's demographics (read back by WADO-RS)."""
    want = {
        i.tags.study_instance_uid: _demographics(i.tags.patient_id, i.tags.study_instance_uid)
        for i in instances
    }
    checked = 0
    for study, by_modality in _results(server).items():
        for series in _series(server, study):
            if series.get("00080060", {}).get("Value", [""])[0] not in by_modality:
                continue
            uid = series["0020000E"]["Value"][0]
            metas = requests.get(
                f"{server.dicomweb_url}/studies/{study}/series/{uid}/metadata", timeout=10
            ).json()
            for meta in metas:
                got = {k: _value(meta, tag) for k, tag in _DEMOGRAPHICS.items()}
                assert got == want[study], (got, want[study])
                checked += 1
    assert checked >= 2


def _env(tmp_path: Path) -> dict[str, str]:
    return {"CXR_SCORE__CACHE_DIR": str(tmp_path / "cache"), **_FAST}


def _series(server: Orthanc, study: str) -> list[dict]:
    r = requests.get(f"{server.dicomweb_url}/studies/{study}/series", timeout=10)
    return r.json() if r.status_code == 200 else []


def _results(server: Orthanc) -> dict[str, dict[str, list[str]]]:
    """Per study UID: the SOP Instance UIDs of its SR and OT (secondary capture) instances."""
    out: dict[str, dict[str, list[str]]] = {}
    r = requests.get(f"{server.dicomweb_url}/studies", timeout=10)
    for study in [s["0020000D"]["Value"][0] for s in (r.json() if r.status_code == 200 else [])]:
        for series in _series(server, study):
            modality = series.get("00080060", {}).get("Value", [""])[0]
            if modality not in ("SR", "OT"):
                continue
            uid = series["0020000E"]["Value"][0]
            found = requests.get(
                f"{server.dicomweb_url}/studies/{study}/series/{uid}/instances", timeout=10
            ).json()
            sops = [i["00080018"]["Value"][0] for i in found]
            out.setdefault(study, {}).setdefault(modality, []).extend(sops)
    return out


def _qido_sr_studies(server: Orthanc) -> set[str]:
    r = requests.get(f"{server.dicomweb_url}/studies", params={"ModalitiesInStudy": "SR"}, timeout=10)
    return {s["0020000D"]["Value"][0] for s in r.json()} if r.status_code == 200 else set()


def _check_results(server: Orthanc, studies_parquet: Path, source_studies: set[str]) -> None:
    studies = pq.read_table(studies_parquet).to_pylist()
    assessed = {s["study_instance_uid"] for s in studies if s["scored"]}
    flagged = {s["study_instance_uid"] for s in studies if s["scored"] and s["flagged"]}
    assert assessed, "nothing was scored"
    found = _results(server)
    assert {k for k, v in found.items() if "SR" in v} == assessed == _qido_sr_studies(server)
    assert all(len(found[k]["SR"]) == 1 for k in assessed)
    assert {k for k, v in found.items() if "OT" in v} == flagged
    assert all(len(found[k]["OT"]) == 1 for k in flagged)
    # In the source studies: Orthanc made no new study (it keys studies by PatientID + UID).
    assert set(found) <= source_studies
    assert len(requests.get(f"{server.base_url}/studies", timeout=10).json()) == len(source_studies)
    for s in studies:
        want = "delivered" if s["scored"] else "not_applicable"
        assert s["delivery"] == want, s
        assert (s["delivery_error"] is None) == (want == "delivered")


def _no_identifiers(text: str, instances: list[factory.Instance]) -> None:
    assert not re.search(r"\d+\.\d+\.\d+\.\d+\.\d+", text), text  # UIDs (not the IP)
    for inst in instances:
        assert inst.tags.patient_id not in text and inst.tags.accession_number not in text


# ----------------------------------------------------------------------------- no server needed


def test_results_targets_are_checked_before_the_run():
    from cxr_ray.writeback.deliver import check_results_to

    s = load_settings()
    check_results_to("dicomweb://pacs:8042/dicom-web", "dicomweb://other:8042/dicom-web", s)
    check_results_to("dicom://PACS@pacs:104", None, s)
    for bad in ("http://pacs/dicom-web", "dicom://pacs:104", "dicom://WAY-TOO-LONG-AE-TITLE@pacs:104"):
        with pytest.raises(ConfigError):
            check_results_to(bad, None, s)
    # Credentials go to the source or dicomweb.endpoints only.
    auth = load_settings(overrides={"dicomweb": {"username": "u", "password": "p"}})
    with pytest.raises(ConfigError, match="endpoints"):
        check_results_to("dicomweb://elsewhere:8042/dicom-web", "dicomweb://pacs:8042/dicom-web", auth)
    check_results_to("dicomweb://pacs:8042/dicom-web", "dicomweb://pacs:8042/dicom-web", auth)
    listed = load_settings(
        overrides={
            "dicomweb": {"username": "u", "password": "p", "endpoints": ["dicomweb://elsewhere:8042/x"]}
        }
    )
    check_results_to("dicomweb://elsewhere:8042/x", "/some/folder", listed)
    # Pseudonyms never go into a PACS.
    pseudo = load_settings(overrides={"score": {"pseudonymize": True, "pseudonym_key": "k" * 32}})
    with pytest.raises(ConfigError, match="pseudonym"):
        check_results_to("dicom://PACS@pacs:104", None, pseudo)


# ----------------------------------------------------------------------------- acceptance


def test_stow_results_land_in_the_source_study_once(pacs, ray_local, tiny_artifact, tmp_path):
    instances = _cases()
    factory.upload(instances, pacs)
    sources = {i.tags.study_instance_uid for i in instances}
    args = ["score", pacs.source, "--model", str(tiny_artifact), "--results-to", pacs.source]
    first = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "one")], env=_env(tmp_path))
    assert first.exit_code == 0, first.output
    assert "studies delivered" in first.stdout
    _check_results(pacs, tmp_path / "one" / "studies.parquet", sources)
    _check_demographics(pacs, instances)
    before = _results(pacs)
    summary = json.loads((tmp_path / "one" / "summary.json").read_text())
    assessed = sum(1 for s in pq.read_table(tmp_path / "one" / "studies.parquet").to_pylist() if s["scored"])
    assert summary["delivery"]["delivered"] == assessed and summary["delivery"]["error"] == 0
    # A second run delivers the same objects again (same UIDs): nothing is added.
    second = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "two")], env=_env(tmp_path))
    assert second.exit_code == 0, second.output
    assert _results(pacs) == before
    _check_results(pacs, tmp_path / "two" / "studies.parquet", sources)


def test_dimse_only_c_find_source_and_c_store_results(pacs, ray_local, tiny_artifact, tmp_path):
    from pydicom.dataset import Dataset

    from cxr_ray.data.dimse_net import FIND, associate, find, peer

    instances = _cases()
    factory.upload(instances, pacs)
    sources = {i.tags.study_instance_uid for i in instances}
    args = ["score", pacs.dimse_source, "--model", str(tiny_artifact), "--results-to", pacs.dimse_source]
    for run in ("one", "two"):  # the second run adds nothing
        result = CliRunner().invoke(main, [*args, "--out", str(tmp_path / run)], env=_env(tmp_path))
        assert result.exit_code == 0, result.output
        _check_results(pacs, tmp_path / run / "studies.parquet", sources)
        _check_demographics(pacs, instances)
    # Read back over DIMSE too: C-FIND at SERIES level finds one SR series per assessed study.
    studies = pq.read_table(tmp_path / "two" / "studies.parquet").to_pylist()
    assoc = associate(peer(pacs.dimse_source), load_settings().dicomweb.dimse, [(FIND, None)])
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = ""
        q.SeriesInstanceUID = ""
        q.Modality = "SR"
        found = [str(ds.StudyInstanceUID) for ds in find(assoc, q)]
    finally:
        assoc.release()
    assert sorted(found) == sorted(s["study_instance_uid"] for s in studies if s["scored"])


def test_failed_delivery_is_redelivered_once_by_the_next_nightly(pacs, ray_local, tiny_artifact, tmp_path):
    """Results go to a second Orthanc that is down for the first nightly run."""
    import deltalake

    instances = _cases()
    factory.upload(instances, pacs)
    root, env = tmp_path / "nightly", _env(tmp_path)
    with running(tmp_path / "results-pacs") as target:
        target.stop()
        args = ["nightly", pacs.source, "--model", str(tiny_artifact), "--root", str(root)]
        args += ["--results-to", target.source]
        first = CliRunner().invoke(main, args, env=env)
        assert first.exit_code == 0, first.output
        (run_dir,) = (root / "runs").iterdir()
        studies = pq.read_table(run_dir / "studies.parquet").to_pylist()
        assessed = {s["study_key"] for s in studies if s["scored"]}
        assert assessed, first.stdout + str(studies)
        assert all(s["delivery"] == "error" for s in studies if s["scored"])
        errors = " ".join(s["delivery_error"] for s in studies if s["delivery"] == "error")
        assert "cannot reach the DICOMweb server" in errors
        _no_identifiers(errors + first.stdout, instances)
        assert f"0 studies delivered (0 objects), {len(assessed)} failed" in first.stdout

        target.start()
        second = CliRunner().invoke(main, args, env=env)  # nothing new to score; re-delivers
        assert second.exit_code == 0, second.output
        assert f"{len(assessed)} studies delivered" in second.stdout
        assert f"{len(assessed)} of the delivered had failed in an earlier run" in second.stdout
        found = _results(target)
        assert {k for k, v in found.items() if "SR" in v} == assessed
        third = CliRunner().invoke(main, args, env=env)
        assert third.exit_code == 0 and "0 studies delivered" in third.stdout
        assert _results(target) == found
    rows = deltalake.DeltaTable(str(root / "deliveries")).to_pyarrow_table().to_pylist()
    delivered = [r["study_key"] for r in rows if r["delivery"] == "delivered"]
    assert sorted(delivered) == sorted(assessed)  # exactly once each
    assert sorted(r["study_key"] for r in rows if r["delivery"] == "error") == sorted(assessed)
