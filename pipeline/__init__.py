"""Dagster definitions for ldm-pipeline: assets, resources, jobs, schedules, sensors, checks; MLflow tracking."""
