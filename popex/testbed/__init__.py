"""Harness for experiments and integration tests: service launcher, network namespaces, measurement.

Never imported by a tier (tests/test_layout.py checks it).
"""
