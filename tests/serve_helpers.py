"""Start real `miles serve` processes on 127.0.0.1 for tests, and always stop them (shared with the
plugins' tests through `miles_core.testing`)."""

from miles_core.testing import Served, served, start_server, stop_server

__all__ = ["Served", "served", "start_server", "stop_server"]
