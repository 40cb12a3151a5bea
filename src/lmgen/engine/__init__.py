"""engine stage of lmgen."""
