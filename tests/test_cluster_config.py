"""cluster.yaml: valid for Ray's cluster launcher, consistent with the settings it documents, and
commented key by key."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from packaging.specifiers import SpecifierSet

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


def _ray_config_checks():
    """Ray's own (private) config checks: a Ray that moves them fails here, never skips."""
    try:
        from ray.autoscaler._private import util
    except ImportError as exc:
        pytest.fail(
            f"Ray {ray.__version__} moved ray.autoscaler._private.util ({exc}): point this test at "
            "the module that now has prepare_config / validate_config"
        )
    return util


def test_ray_itself_accepts_the_config(config):
    # Ray's own checks after merging its provider defaults; offline, no AWS calls.
    util = _ray_config_checks()
    util.validate_config(util.prepare_config(json.loads(json.dumps(config))))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c.__setitem__("head_node_type", "nope"), "head_node_type"),
        (lambda c: c.__setitem__("max_wrokers", 3), "max_wrokers"),
    ],
    ids=["unknown-head-type", "misspelt-key"],
)
def test_ray_checks_refuse_a_broken_copy(config, change, message):
    util = _ray_config_checks()
    broken = json.loads(json.dumps(config))
    change(broken)
    with pytest.raises((ValueError, jsonschema.ValidationError), match=message):
        util.validate_config(util.prepare_config(broken))


def _workers(config: dict) -> dict[str, dict]:
    return {n: t for n, t in config["available_node_types"].items() if n != config["head_node_type"]}


def _vcpus(instance_type: str) -> int:
    """vCPUs of an EC2 size (``large`` 2, ``xlarge`` 4, ``Nxlarge`` 4N: the same in every family)."""
    size = instance_type.split(".", 1)[1]
    if size == "large":
        return 2
    m = re.fullmatch(r"(\d*)xlarge", size)
    assert m, f"unexpected EC2 size {instance_type}"
    return 4 * int(m.group(1) or 1)


def _gpu_family(instance_type: str) -> bool:
    return instance_type.split(".")[0][0] in "gp"  # g4dn, g5, g6, p4d, p5 ... (c7g is a CPU)


def test_every_node_type_is_defined_and_declares_what_its_machine_has(config):
    types_ = config["available_node_types"]
    assert config["provider"]["type"] == "aws"  # the instance-type rules below are EC2's
    assert config["head_node_type"] in types_
    assert _workers(config), "no worker node types"
    for name, t in types_.items():
        # Declared explicitly: the autoscaler schedules on them before a node of the type exists.
        cpus, gpus = t["resources"].get("CPU"), t["resources"].get("GPU", 0)
        instance = t["node_config"]["InstanceType"]
        assert cpus is not None and 0 <= cpus <= _vcpus(instance), (name, instance, cpus)
        # A GPU machine declares its GPU (or nothing would schedule on it), and only a GPU machine.
        assert (gpus >= 1) == _gpu_family(instance), (name, instance, gpus)
    for name, t in _workers(config).items():
        assert 0 <= t["min_workers"] <= t["max_workers"] <= config["max_workers"], name
    assert config["idle_timeout_minutes"] > 0


def test_the_head_only_coordinates_and_is_not_a_spot_node(config):
    head = config["available_node_types"][config["head_node_type"]]
    # CPU 0: no decode task or actor lands on the head, so a busy pipeline cannot starve the GCS
    # or run it out of memory; job drivers (0 CPUs) still run there.
    assert head["resources"] == {"CPU": 0}
    # Losing the head loses the cluster: it must not be reclaimable capacity.
    assert head["node_config"].get("InstanceMarketOptions", {}).get("MarketType") != "spot"


def _documented_gpu_scoring():
    """The score settings the README gives for GPU actors on this cluster."""
    from cxr_ray.config import load_settings

    readme = (CLUSTER_YAML.parent / "README.md").read_text()
    section = readme.split("## GPU clusters", 1)[1].split("\n## ", 1)[0]
    env = dict(re.findall(r"CXR_SCORE__(\w+)=(\S+?)`?(?=\s|$)", section))
    assert {"GPUS_PER_ACTOR", "ACTORS_MAX"} <= set(env), section
    return load_settings(None, {"score": {k.lower(): v for k, v in env.items()}}).score


def _capacity(config: dict, per_node) -> int:
    """How many of something fit on the cluster at full size (per worker type, under the caps)."""
    total, nodes_left = 0, config["max_workers"]
    for t in _workers(config).values():
        nodes = min(t["max_workers"], nodes_left)
        nodes_left -= nodes
        total += nodes * per_node(t["resources"])
    return total


def test_the_documented_gpu_scoring_pool_fits_the_gpu_workers(config):
    sc = _documented_gpu_scoring()
    assert sc.gpus_per_actor > 0

    def actors(res: dict) -> int:
        if res.get("GPU", 0) < sc.gpus_per_actor:
            return 0
        return int(min(res["GPU"] // sc.gpus_per_actor, res["CPU"] // sc.cpus_per_actor))

    # Every GPU actor of the pool can be placed: actors_max is reachable, not a silent wait.
    assert _capacity(config, actors) >= sc.actors_max
    # Decode tasks run beside them somewhere (the head takes none).
    assert _capacity(config, lambda r: int(r["CPU"] // sc.cpus_per_decode_task)) >= 1


@pytest.mark.parametrize(
    "recipe", sorted((CLUSTER_YAML.parent / "trainers" / "recipes").glob("*.toml")), ids=lambda p: p.stem
)
def test_every_training_recipe_fits_the_cluster(config, recipe):
    from cxr_ray.config import load_settings

    t = load_settings(recipe).train

    def slots(res: dict) -> int:
        cpu_slots = int(res["CPU"] // t.cpus_per_worker)
        return min(int(res.get("GPU", 0)), cpu_slots) if t.use_gpu else cpu_slots

    # All DDP workers start at once (Ray Train waits for the whole group), so all must fit.
    assert _capacity(config, slots) >= t.workers, f"{recipe.name}: {t.workers} workers do not fit"


def test_docker_image_matches_the_installed_ray_and_python_and_has_cuda(config):
    image = config["docker"]["image"]
    m = re.fullmatch(r"rayproject/ray:(\d+\.\d+)\.\d+-py(\d)(\d+)-(gpu|cu\d+)", image)
    assert m, f"{image}: expected a pinned rayproject/ray:X.Y.Z-pyNN-(gpu|cuNN) image"
    ray_minor, py = m.group(1), (int(m.group(2)), int(m.group(3)))
    # The cluster's Ray must be the client's (job submission refuses other minors).
    assert ray_minor == ".".join(ray.__version__.split(".")[:2]), (image, ray.__version__)
    # Its Python is one the package supports.
    requires = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"][
        "requires-python"
    ]
    assert SpecifierSet(requires).contains(f"{py[0]}.{py[1]}"), (image, requires)


def test_setup_installs_the_mounted_checkout_with_the_tensorrt_extra(config):
    commands = " ; ".join(config["setup_commands"])
    m = re.search(r"pip install [^;]*?[\"']?(/[^\"'\[ ]+)\[([^\]]+)\]", commands)
    assert m, commands
    path, extras = m.group(1), m.group(2).split(",")
    assert "tensorrt" in extras  # the GPU workers' engine
    # What it installs is the repository itself, mounted on every node.
    assert config["file_mounts"].get(path) == ".", (path, config["file_mounts"])


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
