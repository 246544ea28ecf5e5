"""Edge security of the fleet: API keys, TLS, request validation (no model, no Ray here)."""
