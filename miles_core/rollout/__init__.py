"""Rollout side of the core: data -> engine -> reward -> group filter -> samples."""
