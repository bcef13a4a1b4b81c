"""Model artifacts: the directory that training writes and scoring, export and reports read.

::

    ARTIFACT/
      model_card.json        the ModelCard (architecture, labels, preprocessing, thresholds...)
      model.safetensors      weights of the CxrNet (tensors only: no code can hide in it)
      drift_reference.safetensors  the drift reference (validation split), named and hashed by
                             the card (``drift_reference_file`` / ``_sha256``), when present
      val_metrics.parquet    validation metrics (written by training)
      training_curve.png     loss / macro-F1 per epoch (written by training)

Loading checks that the card is valid, that the weights' SHA-256 is the one the card
records (a swapped or tampered file is refused) and, unless ``verify_shapes=False``, that
every tensor fits the architecture. torch is imported only to build the network: a scoring
driver whose engine model is already cached (onnxruntime, the usual nightly case) loads and
verifies the artifact without it (torch with its CUDA libraries is ~600 MB of driver memory).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cxr_ray.errors import ModelError
from cxr_ray.io import storage
from cxr_ray.models.card import CARD_FILE, ModelCard

if TYPE_CHECKING:
    import torch

    from cxr_ray.models.factory import CxrNet


def weights_bytes(net: torch.nn.Module) -> bytes:
    """The safetensors bytes of ``net``'s state (what artifacts store)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    return save(state, metadata={"format": "pt"})


DRIFT_REFERENCE_FILE = "drift_reference.safetensors"


def save_artifact(
    net: CxrNet | bytes, card: ModelCard, out: str, *, reference: bytes | None = None
) -> ModelCard:
    """Write weights (a network, or its safetensors bytes), the drift ``reference`` when
    given, and the card to ``out``; the card's hashes are filled in here."""
    data = net if isinstance(net, bytes) else weights_bytes(net)
    update: dict[str, Any] = {"weights_sha256": hashlib.sha256(data).hexdigest()}
    if reference is not None:
        update |= {
            "drift_reference_file": card.drift_reference_file or DRIFT_REFERENCE_FILE,
            "drift_reference_sha256": hashlib.sha256(reference).hexdigest(),
        }
    card = card.model_copy(update=update)
    storage.ensure_dir(out)
    storage.write_bytes(data, storage.join(out, card.weights_file))
    if reference is not None:
        assert card.drift_reference_file is not None
        storage.write_bytes(reference, storage.join(out, card.drift_reference_file))
    # The card goes last: an artifact without a card is incomplete and refused on load.
    storage.write_bytes(card.to_json().encode(), storage.join(out, CARD_FILE))
    return card


def read_card(artifact: str) -> ModelCard:
    uri = storage.join(artifact, CARD_FILE)
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise ModelError(
            f"{artifact!r} is not a cxr-ray model artifact: {CARD_FILE} is missing "
            "(train one with `cxr-ray train` or pass the artifact directory)"
        ) from None
    except UnicodeDecodeError:
        raise ModelError(f"{uri} is not UTF-8 JSON") from None
    return ModelCard.from_json(text, where=uri)


def _state_from_bytes(data: bytes, name: str) -> dict[str, torch.Tensor]:
    from cxr_ray.models.factory import load_state_file

    if name.endswith(".safetensors"):
        from safetensors.torch import load

        try:
            return load(data)
        except Exception as exc:
            raise ModelError(f"{name} is not a valid safetensors file: {exc}") from None
    import io

    return load_state_file(io.BytesIO(data))


@dataclass(frozen=True)
class Artifact:
    uri: str
    card: ModelCard
    #: The weights file's bytes, their SHA-256 checked against the card.
    weights: bytes
    #: The drift reference's bytes (hash checked against the card), ``None`` when the card
    #: names none (artifacts trained before drift references existed).
    reference: bytes | None = None

    @functools.cached_property
    def state(self) -> dict[str, torch.Tensor]:
        """The weights as tensors (imports torch)."""
        return _state_from_bytes(self.weights, self.card.weights_file)

    def build(self) -> CxrNet:
        """The network with the artifact's weights, in eval mode (imports torch)."""
        from cxr_ray.models.factory import create_model

        net = create_model(self.card.arch, num_classes=len(self.card.labels), pretrained=False)
        try:
            net.load_state_dict(self.state, strict=True)
        except RuntimeError as exc:
            raise ModelError(
                f"weights in {self.uri} do not match the card's architecture "
                f"{self.card.arch!r} with {len(self.card.labels)} labels: "
                f"{str(exc).splitlines()[0]}"
            ) from None
        return net.eval()

    @property
    def fingerprint(self) -> str:
        return self.card.weights_sha256


def _read_hashed(artifact: str, name: str, sha256: str | None, what: str, missing: str, verb: str) -> bytes:
    """The bytes of ``ARTIFACT/name``, refused unless their SHA-256 is the one the card records."""
    uri = storage.join(artifact, name)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        raise ModelError(f"{missing} {uri} named by the model card is missing") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise ModelError(
            f"{what} {uri} {verb} not match the model card (sha256 {digest[:12]}... but the card "
            f"records {str(sha256)[:12]}...): the files were modified or mixed up"
        )
    return data


def load_artifact(artifact: str, *, verify_shapes: bool = True) -> Artifact:
    """Read and verify an artifact (card, weights hash and, with ``verify_shapes``, that every
    tensor fits the architecture: that builds the network, so it imports torch).

    Without ``verify_shapes`` a mismatch is still refused, with the same message, the first
    time anything builds the network (exporting ONNX, the torch engine, Grad-CAM); a cached
    engine model was built from these very bytes (its key is the weights hash).
    """
    card = read_card(artifact)
    data = _read_hashed(artifact, card.weights_file, card.weights_sha256, "weights", "weights file", "do")
    reference = None
    if card.drift_reference_file is not None:
        reference = _read_hashed(
            artifact,
            card.drift_reference_file,
            card.drift_reference_sha256,
            "drift reference",
            "drift reference",
            "does",
        )
    art = Artifact(artifact, card, data, reference)
    if verify_shapes:
        art.build()  # fail now, with a clear message, if shapes or labels disagree
    return art


def card_for(net: CxrNet, arch: str, *, input_size: int, intensity: str, **fields: Any) -> ModelCard:
    """A card for a freshly built network (weights hash filled in by ``save_artifact``)."""
    from cxr_ray.models.factory import target_layer_name

    # float32 buffers -> short decimals (0.485, not 0.48500001430511475) in the JSON card.
    mean = tuple(round(float(v), 6) for v in net.mean.flatten().tolist())
    std = tuple(round(float(v), 6) for v in net.std.flatten().tolist())
    return ModelCard(
        arch=arch,
        input_size=(input_size, input_size),
        mean=mean,
        std=std,
        intensity=intensity,
        target_layer=target_layer_name(arch),
        weights_sha256="0" * 64,
        **fields,
    )
