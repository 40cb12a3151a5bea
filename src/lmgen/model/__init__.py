"""model stage of lmgen."""
