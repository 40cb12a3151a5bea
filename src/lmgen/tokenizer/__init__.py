"""tokenizer stage of lmgen."""
