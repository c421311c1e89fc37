"""How a request's ``model`` parameter finds a stored model: by id, by a trusted name, or the default.

A name resolves only among the models registered with the admin token, so an
unauthenticated look-alike (when writes are open) cannot take a name over.
"""

from __future__ import annotations

from typing import Any

from popex.edge.stored_model import StoredModel
from popex.errors import ConfigError, UnknownModelError

__all__ = ["resolve_model"]


def resolve_model(registry: Any, default_model_id: str | None, model: str | None) -> StoredModel:
    """The model a request names (id or unique spec name), or the default one.

    Parameters
    ----------
    registry : ModelRegistry
        The edge's store.
    default_model_id : str or None
        The default model's id, if any.
    model : str or None
        Model id, or the name of a model registered with the admin token; None or "" = the
        default model (or the only one).

    Returns
    -------
    StoredModel

    Raises
    ------
    UnknownModelError
        If nothing matches, or no model is registered.
    ConfigError
        If ``model`` is omitted and several models are registered without a default.
    """
    if model is None or model == "":
        if default_model_id is not None and default_model_id in registry:
            return registry.get(default_model_id)
        ids = registry.ids()
        if not ids:
            raise UnknownModelError("no model is registered on this edge; POST one to /api/v1/models")
        if len(ids) > 1:
            raise ConfigError(f"{len(ids)} models are registered and none is the default; name one with 'model'")
        return registry.get(ids[0])
    if model in registry:
        return registry.get(model)
    # A name only among the models registered with the admin token (unique): no squatting.
    named = [i for i in registry.ids() if registry.get(i).trusted and registry.get(i).name == model]
    if named:
        return registry.get(named[0])
    raise UnknownModelError(f"no model {model!r} is registered on this edge (a name is looked up among the "
                            "models registered with the admin token; others by their id)")
