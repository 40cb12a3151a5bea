"""Chat templates: the sandboxed Jinja renderer (template), its limits, builtin templates and input checks."""
