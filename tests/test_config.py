import pytest
from click.testing import CliRunner

from cxr_ray import vocabulary
from cxr_ray.cli import main
from cxr_ray.config import Settings, check_uri, load_settings, settings_from_dict
from cxr_ray.errors import ConfigError
from cxr_ray.vocabulary import INTENSITY_MODES


def test_priority_flags_over_env_over_toml(tmp_path, monkeypatch):
    toml = tmp_path / "cxr.toml"
    toml.write_text('[train]\nepochs = 7\nworkers = 3\nlr = 0.5\n[score]\nengine = "torch"\n')
    monkeypatch.setenv("CXR_TRAIN__WORKERS", "5")
    monkeypatch.setenv("CXR_TRAIN__LR", "0.25")
    s = load_settings(toml, {"train": {"lr": 0.125, "epochs": None}})
    assert s.train.epochs == 7  # TOML (flag unset)
    assert s.train.workers == 5  # env beats TOML
    assert s.train.lr == 0.125  # flag beats env
    assert s.score.engine == "torch"
    assert s.train.batch_size == Settings().train.batch_size  # default


def test_field_by_field_errors():
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"train": {"workers": -1}, "score": {"engine": "tpu"}})
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid settings:"
    assert any(line.strip().startswith("train.workers:") and "-1" in line for line in lines)
    assert any("score.engine" in line and "onnxruntime" in line for line in lines)


def test_unknown_keys_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nepoch = 3\n")
    with pytest.raises(ConfigError, match=r"train\.epoch"):
        load_settings(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml")


@pytest.mark.parametrize("uri", ["s3://", "s3:/bucket/x", "s3://UPPER_bucket/x", "ftp://host/x"])
def test_malformed_uris_rejected(uri):
    with pytest.raises(ValueError):
        check_uri(uri)


@pytest.mark.parametrize("uri", ["runs", "/abs/runs", "s3://my-bucket/runs", "gs://bkt/p", "file:///x"])
def test_good_uris_accepted(uri):
    assert check_uri(uri) == uri


def test_workers_get_plain_dicts_back():
    s = load_settings(None, {"model": {"input_size": 192}})
    again = settings_from_dict(s.model_dump(mode="json"))
    assert again.model_dump() == s.model_dump()
    assert again.model.input_size == 192


def test_cli_invalid_setting_exits_2_without_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("CXR_DATA__MAX_PIXELS", "-5")
    result = CliRunner().invoke(main, ["manifest", str(tmp_path), "--out", str(tmp_path / "m.parquet")])
    assert result.exit_code == 2
    assert "data.max_pixels" in result.output
    assert "Traceback" not in result.output


def test_every_shipped_recipe_is_valid():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "trainers" / "recipes").glob("*.toml"))
    assert len(recipes) >= 7
    for recipe in recipes:
        s = load_settings(recipe)
        assert s.model.arch in recipe.name
    default = load_settings(recipes[[r.name for r in recipes].index("mobilenet_v2_cpu.toml")])
    assert default.train == Settings().train  # the file documents the built-in defaults


def test_one_invalid_field_is_one_line_naming_the_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"model": {"intensity": "sharpen"}})
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.startswith("invalid settings: model.intensity: unknown intensity mode 'sharpen'")
    assert all(mode in msg for mode in INTENSITY_MODES) and "CXR_MODEL__INTENSITY" in msg


def test_settings_use_the_one_vocabulary():
    import cxr_ray.config as config

    assert config.ARCHITECTURES is vocabulary.ARCHITECTURES and config.ENGINES is vocabulary.ENGINES
    for arch in vocabulary.ARCHITECTURES:
        assert load_settings(None, {"model": {"arch": arch}}).model.arch == arch
    for engine in vocabulary.ENGINES:
        assert load_settings(None, {"score": {"engine": engine}}).score.engine == engine


@pytest.mark.parametrize("mode", INTENSITY_MODES)
def test_every_intensity_the_settings_accept_is_implemented(mode):
    """Settings, the model's preprocessing spec and the decoder agree on each mode."""
    from cxr_ray.imaging.preprocess import decode
    from cxr_ray.models.card import spec_for
    from tests import imaging

    s = load_settings(None, {"model": {"intensity": mode, "input_size": 64}})
    spec = spec_for(s.model, s.data)
    assert spec.intensity == mode
    pixels = decode(imaging.jpeg_bytes(seed=5), spec).pixels
    assert pixels.shape == (64, 64) and pixels.dtype.name == "uint8"


SECRET = "Sup3r-Secret-Passw0rd!"


@pytest.mark.parametrize(
    "env, field",
    [
        ("CXR_DICOMWEB__PASSWROD", "dicomweb.passwrod"),  # a typo of a secret: an unknown field
        ("CXR_DICOMWEB__TOKEN", None),  # malformed? no: any string is a valid token; see below
        ("CXR_DICOMWEB__PAGE_SIZE", "dicomweb.page_size"),  # a secret section's ordinary field
        ("CXR_SCORE__PSEUDONYM_KEYY", "score.pseudonym_keyy"),
        ("CXR_TRAIN__EPOCHZ", "train.epochz"),  # an unknown field anywhere
        ("CXR_DICOMWEB__STUDY_DATE", "dicomweb.study_date"),  # a validator quoting its input
    ],
)
def test_settings_errors_never_echo_secret_or_unknown_values(monkeypatch, env, field):
    """Issue 24 defect 10: no input value of a secret section or of an unknown field is printed."""
    monkeypatch.setenv(env, SECRET)
    if field is None:  # a valid token next to a bad field: the error must not print the token
        monkeypatch.setenv("CXR_DICOMWEB__USERNAME", "svc")
        field = "dicomweb"
    with pytest.raises(ConfigError) as err:
        load_settings(None)
    msg = str(err.value)
    assert field in msg
    assert SECRET not in msg and SECRET.lower() not in msg and SECRET.upper() not in msg
    result = CliRunner().invoke(main, ["manifest", "/nonexistent", "--out", "/tmp/never.parquet"])
    assert result.exit_code == 2 and SECRET not in result.output


def test_settings_errors_still_show_ordinary_values():
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"train": {"workers": -1}})
    assert "(got -1)" in str(err.value)
