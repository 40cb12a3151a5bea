"""A GGUF file's vocabulary: metadata (vocab), pre-tokenizer regexes, BPE and SentencePiece model builders."""
