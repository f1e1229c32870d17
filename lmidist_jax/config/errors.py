"""The configuration's error type, shared by the option table and the properties reader."""

from __future__ import annotations


class ConfigError(ValueError):
    """An option has a value that is not accepted (the message names option, value and
    what is accepted)."""
