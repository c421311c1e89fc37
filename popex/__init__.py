"""POPEX: early-exit inference split between an edge node and a cloud server."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``from popex import export`` without importing torch at ``import popex`` time."""
    if name == "export":
        from popex.nets.export import export
        return export
    if name == "export_model":
        from popex.nets.export import export_model
        return export_model
    raise AttributeError(f"module 'popex' has no attribute {name!r}")
