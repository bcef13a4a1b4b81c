"""The error hierarchy. Messages say what was wrong and what to do about it."""

from __future__ import annotations


class CxrRayError(Exception):
    """Base class for every error cxr-ray raises on purpose."""


class ConfigError(CxrRayError):
    """Invalid settings, flags or config file."""


class DataError(CxrRayError):
    """An input (archive, file, manifest, image) cannot be used."""


class DecodeError(DataError):
    """One image cannot be decoded; scoring turns this into an error row."""


class ModelError(CxrRayError):
    """A model artifact, model card or weight file is missing, unsafe or inconsistent."""


class WeightsUnavailableError(ModelError):
    """Pretrained weights are not available offline."""


class EngineUnavailableError(CxrRayError):
    """The requested inference engine cannot run here (missing package, no GPU, ...)."""
