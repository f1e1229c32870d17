"""The HTTP server (LMI schema + OpenAI chat completions and completions): ``create_app`` /
``serve``."""

from .app import create_app, set_engine_loop, set_startup_error
from .lifecycle import serve

__all__ = ["create_app", "serve", "set_engine_loop", "set_startup_error"]
