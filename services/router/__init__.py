"""The fleet's front door: gRPC + OpenAI-compatible HTTP, and the per-request speculative
loop over the prefill, target and drafter workers."""
