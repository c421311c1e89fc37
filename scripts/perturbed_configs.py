"""Write an edge and a cloud config file in which every numeric default is changed.

CI points ``POPEX_EDGE_CONFIG`` and ``POPEX_CLOUD_CONFIG`` at them for the
whole test run: a test builds its config from its own mapping (the YAML and
environment layers are replaced, not laid under it), so none of these values
may reach a test. Each value is the first of 2x, x/2, x+1, x-1 that the config
class accepts, so the files stay valid configs: a service started with them
would run.

Usage: ``python scripts/perturbed_configs.py OUT_DIR`` writes
``OUT_DIR/edge.yaml`` and ``OUT_DIR/cloud.yaml`` and prints what it changed.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_api.config import CloudConfig  # noqa: E402
from edge_api.config import EdgeConfig  # noqa: E402
from popex.errors import ConfigError  # noqa: E402

_TOKEN = "perturbed-config-token"


def _candidates(value: int | float) -> list[int | float]:
    if isinstance(value, int):
        return [value * 2, value // 2, value + 1, value - 1]
    return [value * 2, value / 2, value + 1, value - 1] if value else [0.5, 1.0, 0.01]


def perturbed(config_class: type) -> dict[str, int | float]:
    """Every numeric field of ``config_class`` with a changed, accepted value."""
    changed: dict[str, int | float] = {}
    for field in dataclasses.fields(config_class):
        default = field.default
        if isinstance(default, bool) or not isinstance(default, (int, float)):
            continue
        for value in _candidates(default):
            try:
                config_class.from_mapping({"token": _TOKEN, field.name: value})
            except ConfigError:
                continue
            changed[field.name] = value
            break
        else:
            raise SystemExit(f"no changed value of {config_class.__name__}.{field.name} is accepted")
    config_class.from_mapping({"token": _TOKEN, **changed})  # all together are a valid config too
    return changed


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[-2], file=sys.stderr)
        return 2
    out_dir = Path(argv[0])
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, config_class in (("edge", EdgeConfig), ("cloud", CloudConfig)):
        values = perturbed(config_class)
        (out_dir / f"{name}.yaml").write_text(yaml.safe_dump(values, sort_keys=True))
        print(f"perturbed {name} config ({len(values)} numeric keys): "
              + ", ".join(f"{key}={value:g}" for key, value in values.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
