"""The running system: job records and their lifecycle, the Celery queue, worker heartbeats, events, metrics and upkeep."""
