"""The `image_dataset` asset: see asset.py."""
