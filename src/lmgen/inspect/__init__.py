"""The generation inspector: watch each step of generation (tokens, candidates, filters, beams, KV cache, attention)
in a browser page served by `lmgen serve` at /inspect, over a JSON API at /v1/inspect."""
