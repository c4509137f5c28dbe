"""Code both sides of the fleet import: wire protocol, features, bundles, profiles, update states.

Nothing in here imports ``edge_agent`` or ``collector``.
"""

__version__ = "0.1.0"
PROTOCOL_VERSION = 1
