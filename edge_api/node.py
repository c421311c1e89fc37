"""The app's one extension: the :class:`~popex.edge.node.EdgeNode`, and its one accessor."""

from __future__ import annotations

from flask import Flask, current_app

from popex.edge.node import EdgeNode

__all__ = ["NODE_KEY", "get_node"]

NODE_KEY = "popex_edge_node"  # the only app.extensions key of the edge app


def get_node(app: Flask | None = None) -> EdgeNode:
    """The :class:`EdgeNode` of ``app`` (default: the app handling the current request)."""
    return (current_app if app is None else app).extensions[NODE_KEY]
