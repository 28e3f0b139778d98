"""The verifier service: runs the target model, verifies proposals, owns the KV cache."""
