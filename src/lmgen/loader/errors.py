"""Errors raised while loading a model: always a message a user can act on, never a bare traceback."""


class ModelLoadError(ValueError):
    """A model file or folder is missing, truncated, corrupt, or does not match its own config."""
