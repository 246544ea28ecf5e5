"""Thin deployables of the fleet: router, workers, shared state."""
