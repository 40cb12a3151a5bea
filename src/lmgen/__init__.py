"""lmgen: a readable text-generation engine for LLaMA-family models."""
