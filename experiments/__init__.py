"""Experiment runners (``popex experiment NAME``): each starts real services through popex.testbed."""
