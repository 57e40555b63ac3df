"""Prefect flows that sequence the pipeline's tasks: `compress`, `sweep`, `promote`, `watch`."""

import logging

# Prefect's console handler sits on the root logger at WARNING; the library's INFO lines (split
# hash, measured sparsity, healing time) belong in a run's log, and with
# PREFECT_LOGGING_EXTRA_LOGGERS=starfish in the Prefect UI too.
logging.getLogger("starfish").setLevel(logging.INFO)
