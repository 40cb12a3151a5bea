"""Layers shared by the model families: attention (RoPE + KV write + attention), linear / packed layers, norms."""
