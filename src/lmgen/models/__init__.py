"""Model families: one file per architecture family, found through models.registry."""
