"""What the two Flask apps share: the one error handler (DESIGN §6 JSON), logging, metrics, OpenAPI.

Flask-side, so not in popex.
"""
