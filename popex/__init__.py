"""POPEX: early-exit inference split between an edge node and a cloud server."""

__version__ = "0.1.0"
