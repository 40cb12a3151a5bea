"""chat stage of lmgen."""
