"""Ray Serve deployments of the fleet: prefill, target and drafter workers (thin wrappers
around the library's engine pieces)."""
