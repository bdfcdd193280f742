"""The `vae_model` asset: see asset.py."""
