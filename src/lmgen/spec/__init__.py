"""Speculative decoding: proposers (n-gram lookup, a draft model, the packed self-draft) and exact verification."""
