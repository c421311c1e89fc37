"""Early-exit networks: the spec format, the network, its artifacts, the zoo."""

from popex.nets.early_exit import CONFIDENCE_METHODS, EarlyExitNet, exit_confidence
from popex.nets.io import (
    CALIBRATION_FILE,
    SPEC_FILE,
    WEIGHTS_FILE,
    LoadedModel,
    compute_model_id,
    load_model,
    load_model_bytes,
    load_weights,
    save_model,
    weights_to_bytes,
)
from popex.nets.spec import LAYER_TYPES, canonical_spec_bytes, parse_spec_json, validate_spec
from popex.nets.zoo import ZOO, zoo_spec

__all__ = [
    "CALIBRATION_FILE",
    "CONFIDENCE_METHODS",
    "EarlyExitNet",
    "LAYER_TYPES",
    "LoadedModel",
    "SPEC_FILE",
    "WEIGHTS_FILE",
    "ZOO",
    "canonical_spec_bytes",
    "compute_model_id",
    "exit_confidence",
    "load_model",
    "load_model_bytes",
    "load_weights",
    "parse_spec_json",
    "save_model",
    "validate_spec",
    "weights_to_bytes",
    "zoo_spec",
]
