"""The model registry: pushed bundles validated, re-signed and stored by content, with lineage, stages and cards."""
