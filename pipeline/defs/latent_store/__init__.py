"""The `latent_store` asset: see asset.py."""
