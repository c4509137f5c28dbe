"""Sensor backends behind one small interface (:class:`edge_agent.sensors.base.Source`)."""
