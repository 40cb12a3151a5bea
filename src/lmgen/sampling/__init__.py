"""sampling stage of lmgen."""
