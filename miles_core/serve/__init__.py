"""Rollout as a service: `miles serve` (the built-in engine behind SGLang's HTTP protocol), the router and
the HTTP rollout client (`--rollout-backend http` / `sglang`).

- ``protocol``: request/response encoding shared by all three.
- ``server``: the aiohttp app around an `Engine`; ``miles serve --hf-checkpoint DIR --port N``.
- ``router``: least-in-flight balancing, health checks and retries over N engines (``miles router``,
  and in-process as `WorkerPool`).
- ``client``: the rollout backend that talks to engines through the pool or a router.
"""
