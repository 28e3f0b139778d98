"""Example drafter backends, run by tests so that docs/drafters.md stays true."""
