"""Start real `miles serve` processes on 127.0.0.1 for tests, and always stop them (shared with the
plugins' tests through `miles_core.testing`)."""

from miles_core.testing import (
    Served,
    http_json,
    launch_server,
    serve_env,
    served,
    served_many,
    start_server,
    stop_server,
    wait_server,
)

__all__ = [
    "Served",
    "http_json",
    "launch_server",
    "serve_env",
    "served",
    "served_many",
    "start_server",
    "stop_server",
    "wait_server",
]
