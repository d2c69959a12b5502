"""`dsv3 serve`: an OpenAI-compatible HTTP server over the continuous-batching engine."""

from dsv3.serve.app import create_app
from dsv3.serve.state import ServeConfig

__all__ = ["create_app", "ServeConfig"]
