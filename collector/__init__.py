"""The central collector: ingest, store, registry, monitoring and rollouts, behind an HTTP API."""

__version__ = "0.1.0"
