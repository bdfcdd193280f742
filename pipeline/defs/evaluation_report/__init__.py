"""The `evaluation_report` asset: see asset.py."""
