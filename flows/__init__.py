"""Prefect flows that sequence the pipeline's tasks: `compress`, `sweep`, `promote`."""
