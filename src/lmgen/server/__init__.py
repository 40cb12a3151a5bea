"""server stage of lmgen."""
