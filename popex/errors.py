"""Exceptions raised by popex.

Every message is meant for a user: it names the bad value and, where it
helps, what to do. The services map these to DESIGN.md §6 JSON errors, so a
``PopexError`` is always a 4xx, never a 5xx.
"""

__all__ = [
    "PopexError",
    "SpecError",
    "WeightsError",
    "CalibrationError",
    "ProfileError",
    "DataError",
    "ConfigError",
]


class PopexError(Exception):
    """Base class: an error caused by input, reported without a traceback."""

    code = "popex_error"


class SpecError(PopexError):
    """A model spec (JSON) is malformed or does not build."""

    code = "bad_spec"


class WeightsError(PopexError):
    """A weights file is not safetensors or does not match its spec."""

    code = "bad_weights"


class CalibrationError(PopexError):
    """A calibration .npz is malformed or does not match its model."""

    code = "bad_calibration"


class ProfileError(PopexError):
    """A latency profile is malformed or does not match its model."""

    code = "bad_profile"


class DataError(PopexError):
    """A dataset file or an image cannot be read."""

    code = "bad_data"


class ConfigError(PopexError):
    """A configuration value is missing or out of range."""

    code = "bad_config"
