"""The HTTP server (LMI schema + OpenAI chat completions): ``create_app`` / ``serve``."""

from .app import create_app, serve, set_engine_loop, set_startup_error

__all__ = ["create_app", "serve", "set_engine_loop", "set_startup_error"]
