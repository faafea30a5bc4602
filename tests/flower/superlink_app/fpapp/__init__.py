"""flowerpets' SuperLink test app (see tests/flower/test_superlink.py)."""
