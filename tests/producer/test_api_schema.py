"""schemathesis against the app's own OpenAPI schema: no generated request causes a server error.

Each operation gets its own hypothesis run over the schema's strategy (schemathesis's pytest
plugin does not yet follow pytest 9, so the operations are walked here).
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from schemathesis.checks import not_a_server_error

from lorafleet.producer.api import create_app


@pytest.fixture
def empty_hub(monkeypatch):
    """A hub on loopback that has no repo: generated LoRA sources like "0/0" are looked up
    there (answered "not found"), never on huggingface.co."""
    import huggingface_hub.constants

    class NoRepo(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), NoRepo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
    yield
    server.shutdown()
    server.server_close()


def test_no_request_makes_the_api_fail(settings, empty_hub):
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings))
    schema.config.max_stream_events = 1  # /v1/events never ends: its first event is enough here
    labels = []
    for result in schema.get_all_operations():
        operation = result.ok()
        labels.append(operation.label)

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=25, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def no_server_error(case):
            case.call_and_validate(checks=[not_a_server_error])

        no_server_error()
    assert "POST /v1/jobs" in labels and "GET /v1/jobs" in labels and len(labels) >= 10
