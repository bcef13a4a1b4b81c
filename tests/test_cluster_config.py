"""cluster.yaml: valid for Ray's cluster launcher, the intended shape, and commented key by key."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "cluster.yaml"
RAY_SCHEMA = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"


@pytest.fixture(scope="module")
def text() -> str:
    return CLUSTER_YAML.read_text()


@pytest.fixture(scope="module")
def config(text) -> dict:
    return yaml.safe_load(text)


def _node_type(config: dict, kind: str) -> dict:
    return config["available_node_types"][kind]


def test_validates_against_the_autoscaler_schema_shipped_with_ray(config):
    assert RAY_SCHEMA.is_file(), f"Ray no longer ships {RAY_SCHEMA}"
    schema = json.loads(RAY_SCHEMA.read_text())
    jsonschema.validate(config, schema)


def test_ray_itself_accepts_the_config(config):
    # Ray's own (private) checks after merging its provider defaults; offline, no AWS calls.
    util = pytest.importorskip("ray.autoscaler._private.util")
    util.validate_config(util.prepare_config(json.loads(json.dumps(config))))


def test_cpu_head_and_gpu_and_cpu_worker_types(config):
    types_ = config["available_node_types"]
    head = types_[config["head_node_type"]]
    assert config["provider"]["type"] == "aws"
    assert "GPU" not in head["resources"] and head["resources"].get("CPU") == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))

    gpu = [t for name, t in types_.items() if t["resources"].get("GPU", 0) >= 1]
    cpu = [
        t
        for name, t in types_.items()
        if name != config["head_node_type"] and t["resources"].get("GPU", 0) == 0
    ]
    assert len(gpu) == 1 and len(cpu) == 1
    assert re.match(r"^g[56]\.", gpu[0]["node_config"]["InstanceType"])
    assert re.match(r"^c\d", cpu[0]["node_config"]["InstanceType"])
    for worker in (gpu[0], cpu[0]):
        assert worker["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
        assert 0 <= worker["min_workers"] <= worker["max_workers"]
    total = sum(t.get("max_workers", 0) for t in (gpu[0], cpu[0]))
    assert total <= config["max_workers"]
    assert config["idle_timeout_minutes"] > 0


def test_docker_image_is_ray_2_60_with_cuda_matching_the_installed_ray(config):
    image = config["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+)\.\d+-py311-(gpu|cu\d+)", image)
    assert m, image
    assert m.group(1) == "2.60" and ray.__version__.startswith("2.60.")


def test_setup_installs_cxr_ray_with_the_tensorrt_extra(config):
    commands = " ; ".join(config["setup_commands"])
    assert re.search(r"pip install .*cxr-ray\[tensorrt\]", commands), commands
    # The package source it installs from is mounted on every node.
    assert any(p.endswith("cxr-ray") for p in config["file_mounts"])


def _key_lines(text: str) -> list[tuple[int, str]]:
    """(line number, key) of every mapping key in the document, at any depth."""
    out: list[tuple[int, str]] = []

    def walk(node: yaml.Node) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                out.append((key.start_mark.line, key.value))
                walk(value)
        elif isinstance(node, yaml.SequenceNode):
            for item in node.value:
                walk(item)

    root = yaml.compose(text)
    assert root is not None
    walk(root)
    return out


def test_every_key_is_commented(text):
    lines = text.splitlines()
    missing = []
    for lineno, key in _key_lines(text):
        line = lines[lineno]
        if re.search(r"\s#", line):
            continue  # a trailing comment explains it
        previous = next((p for p in reversed(lines[:lineno]) if p.strip()), "")
        if not previous.lstrip().startswith("#"):
            missing.append(f"line {lineno + 1}: {key}")
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_top_level_and_node_type_keys_are_all_covered(config, text):
    # Guard against the comment check silently skipping keys (e.g. a parsing change).
    checked = {key for _, key in _key_lines(text)}
    assert set(config) <= checked
    for node_type, spec in config["available_node_types"].items():
        assert node_type in checked and set(spec) <= checked
