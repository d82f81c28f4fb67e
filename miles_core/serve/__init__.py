"""Rollout as a service: `miles serve` (the built-in engine behind SGLang's HTTP protocol), the router and
the HTTP rollout client (`--rollout-backend http` / `sglang`).

- ``protocol``: request/response encoding shared by all three.
- ``server``: the aiohttp app around an `Engine`; ``miles serve --hf-checkpoint DIR --port N``.
- ``pool``: `WorkerPool`, least-in-flight balancing, health checks and retries over N engines, in-process.
- ``router``: the pool behind HTTP (``miles router``; `RouterThread` runs it on a background thread).
- ``client``: the rollout backends ``http`` and ``sglang``, talking to engines through the pool or a router.
- ``launch``: the run's local engine processes (`miles serve` or SGLang): start, health, restart, stop.
- ``updater``: weight updates to engines (tensor, disk, distributed) and catching up a restarted one.
- ``remote``: the client's background event loop and control requests.
"""
