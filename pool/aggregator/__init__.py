"""The health aggregator: Celery's events for live state, Redis for the durable figures,
an HTTP API (JSON, Prometheus) and a dashboard."""
