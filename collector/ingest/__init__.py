"""Ingest: MQTT messages to committed rows, exactly once (see ``service``), written in bulk (see ``bulk``)."""

from collector.ingest.service import Ingest

__all__ = ["Ingest"]
