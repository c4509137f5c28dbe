"""Deployment files shipped with the collector (the production broker configuration)."""
