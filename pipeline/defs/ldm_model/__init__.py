"""The `ldm_model` asset: see asset.py."""
