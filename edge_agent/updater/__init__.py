"""The device-side model updater (ARCHITECTURE §5).

* :mod:`edge_agent.updater.machine`: the state machine, one method per state, driven by
  :data:`shared.update.TRANSITIONS`;
* :mod:`edge_agent.updater.download`: resumable HTTP download (Range, ``.part`` file, bandwidth cap);
* :mod:`edge_agent.updater.conditions`: parked, depot network, time window; hardware profile and
  agent version compatibility;
* :mod:`edge_agent.updater.store`: the persisted record (atomic write + fsync), local install
  requests and the state-directory lock.

Submodules are imported explicitly (the configuration imports the conditions module).
"""
