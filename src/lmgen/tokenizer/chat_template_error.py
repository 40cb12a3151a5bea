"""The one error chat template compiling and rendering raise, shared by the chat_template* modules."""

from __future__ import annotations

__all__ = ["ChatTemplateError"]


class ChatTemplateError(ValueError):
    """A chat template could not be compiled or rendered, or its input was malformed."""
