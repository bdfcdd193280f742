"""One module per asset. Each is a thin adapter: typed config → one call into ldm_core → metadata."""
