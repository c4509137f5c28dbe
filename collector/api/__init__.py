"""The collector's HTTP API under ``/api/v1`` (ARCHITECTURE §7): one router module per resource."""
