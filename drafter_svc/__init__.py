"""The drafter service: one gRPC interface, pluggable proposer backends (prompt lookup, draft model, ...)."""
