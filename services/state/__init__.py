"""Shared fleet state in Redis: request registry, token log, KV rendezvous."""
