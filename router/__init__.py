"""The router: the client-facing front door. It tokenizes, runs the continuous batch, picks how much to
speculate per request (a pluggable policy), calls the drafters and the verifier, and streams text back."""
