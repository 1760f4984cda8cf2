"""Input images by http(s) URL: fetched once at submit from a real loopback server, stored by
their sha256 like an upload, the job naming the stored bytes; a page that is not an image and
an address the rules refuse store nothing."""

from __future__ import annotations

import pytest

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus
from tests.worker.test_images_in import (  # noqa: F401  (reference: a fixture)
    JOB,
    LORA,
    decoded,
    diffusers_image,
    mask,
    merge_peft,
    photo,
    reference,
    stored_inputs,
    submitted,
)
from tests.worker.test_runner import client  # noqa: F401  (a fixture)


@pytest.fixture
def image_server():
    """A real HTTP server on loopback: /photo.png, /moved (a redirect to it), /page (HTML)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    data = photo(70)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            if self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/photo.png")
                self.end_headers()
                return
            body, kind = (
                (data, "image/png") if self.path == "/photo.png" else (b"<html>login</html>", "text/html")
            )
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", data
    server.shutdown()


def test_an_init_image_by_url_is_fetched_once_and_stored_by_its_hash(settings, image_server, runner):
    from lorafleet.common.catalog.input_images import image_ref
    from lorafleet.producer.client import Client

    base, data = image_server
    with Client(settings) as closed:  # loopback is not a public address: refused, nothing stored
        with pytest.raises(JobRejected) as refused:
            closed.submit(JOB | {"init_image": f"{base}/photo.png"})
        assert refused.value.field == "init_image" and "not a public address" in str(refused.value)
    assert stored_inputs(runner) == []
    with Client(settings.model_copy(update={"api_import_hosts": "127.0.0.1"})) as opened:
        job = opened.submit(JOB | {"init_image": f"{base}/moved", "strength": 0.6}).job
        assert job.init_image == image_ref(data)  # the record names the bytes it ran with
        runner.run(job.job_id)
        assert opened.get(job.job_id).status is JobStatus.succeeded
        with pytest.raises(JobRejected) as page:
            opened.submit(JOB | {"init_image": f"{base}/page"})
        assert page.value.field == "init_image" and "not an image" in str(page.value)
    assert stored_inputs(runner) == [image_ref(data).removeprefix("sha256:")]
