"""`lorafleet loras import SOURCE` from where people get LoRAs: a download link (redirects,
Content-Disposition), a hub repo (a local server that answers the way the hub does, reached
through HF_ENDPOINT), a diffusers folder. Every failure leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.helpers import free_port, lorafleet_env, run_cli

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Site:
    """A loopback HTTP server whose routes map a path to (status, headers, body)."""

    def __init__(self) -> None:
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        site = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, with_body: bool) -> None:
                path = self.path.split("?")[0]
                status, headers, body = site.routes.get(
                    path, (404, {"X-Error-Code": "EntryNotFound"}, b"nope")
                )
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", headers.get("Content-Length", str(len(body))))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def do_GET(self):  # noqa: N802
                self._answer(True)

            def do_HEAD(self):  # noqa: N802
                self._answer(False)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_port}"

    def file(self, path: str, body: bytes, **headers: str) -> None:
        self.routes[path] = (200, {"Content-Type": "application/octet-stream", **headers}, body)

    def hub_repo(self, repo: str, files: dict[str, bytes]) -> None:
        """What huggingface_hub reads: the repo tree, and each file's resolve URL (HEAD and GET)."""
        tree = [
            {"type": "file", "path": name, "size": len(body), "oid": hashlib.sha1(body).hexdigest()}
            for name, body in files.items()
        ]
        self.routes[f"/api/models/{repo}/tree/main"] = (
            200,
            {"Content-Type": "application/json"},
            json.dumps(tree).encode(),
        )
        for name, body in files.items():
            etag = f'"{hashlib.sha256(body).hexdigest()}"'
            self.file(f"/{repo}/resolve/main/{name}", body, **{"X-Repo-Commit": COMMIT, "ETag": etag})

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture
def site():
    server = Site()
    yield server
    server.close()


def lora_bytes(home) -> bytes:
    return (home / "autoimport" / "lora" / "watercolor.safetensors").read_bytes()


def leftovers(home) -> list[str]:
    downloads = home / "cache" / "downloads"
    return sorted(p.name for p in downloads.iterdir()) if downloads.is_dir() else []


@pytest.mark.slow
def test_a_download_link_that_redirects_is_imported_under_its_content_disposition_name(home, site):
    body = lora_bytes(home)
    site.routes["/api/download/models/1234"] = (302, {"Location": "/files/abc"}, b"")
    site.file("/files/abc", body, **{"Content-Disposition": 'attachment; filename="mystyle_v2.safetensors"'})
    digest = hashlib.sha256(body).hexdigest()
    result = run_cli(
        ["loras", "import", f"{site.url}/api/download/models/1234", "--sha256", digest],
        lorafleet_env(home, None),
    )
    assert result.returncode == 0, result.stderr
    imported = home / "autoimport" / "lora" / "mystyle_v2.safetensors"
    assert imported.read_bytes() == body and "imported mystyle_v2" in result.stdout
    assert leftovers(home) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    "route, words",
    [
        ((200, {"Content-Type": "text/html; charset=utf-8"}, b"<html>log in</html>"), "answered a web page"),
        ((403, {}, b"forbidden"), "answered HTTP 403"),
        (
            (200, {"Content-Type": "application/octet-stream"}, b"\x01\x02not safetensors"),
            "is not a usable LoRA: header length",
        ),
        ((200, {"Content-Length": str(5 * 1024**3)}, b""), "over the 4 GiB cap"),
    ],
)
def test_a_bad_download_is_refused_saying_what_happened_and_leaves_nothing(home, site, route, words):
    site.routes["/get"] = route
    before = sorted(p.name for p in (home / "autoimport" / "lora").iterdir())
    result = run_cli(["loras", "import", f"{site.url}/get", "--name", "fresh"], lorafleet_env(home, None))
    assert result.returncode == 2 and words in result.stderr, result.stderr
    assert sorted(p.name for p in (home / "autoimport" / "lora").iterdir()) == before
    assert leftovers(home) == []


@pytest.mark.slow
def test_a_hash_that_does_not_match_is_refused(home, site):
    site.file("/f.safetensors", lora_bytes(home))
    result = run_cli(
        ["loras", "import", f"{site.url}/f.safetensors", "--sha256", "0" * 64], lorafleet_env(home, None)
    )
    assert result.returncode == 2 and "not the 0000" in result.stderr
    assert not (home / "autoimport" / "lora" / "f.safetensors").exists() and leftovers(home) == []


@pytest.mark.slow
def test_a_hub_repo_with_diffusers_weights_is_imported_like_the_guides_lcm_loras(home, site, tmp_path):
    body = lora_bytes(home)
    site.hub_repo(
        "latent-consistency/lcm-lora-tiny", {"pytorch_lora_weights.safetensors": body, "README.md": b"hi"}
    )
    site.hub_repo("someone/styles", {"a.safetensors": body, "b.safetensors": body})
    env = lorafleet_env(
        home, None, HF_ENDPOINT=site.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1"
    )
    result = run_cli(["loras", "import", "latent-consistency/lcm-lora-tiny"], env)
    assert result.returncode == 0, result.stderr
    assert (home / "autoimport" / "lora" / "lcm-lora-tiny.safetensors").read_bytes() == body
    result = run_cli(["loras", "import", "someone/styles"], env)
    assert (
        result.returncode == 2
        and "holds 2 .safetensors files" in result.stderr
        and "b.safetensors" in result.stderr
    )
    result = run_cli(["loras", "import", "someone/styles/b.safetensors", "--name", "style-b"], env)
    assert result.returncode == 0, result.stderr
    result = run_cli(["loras", "import", "someone/missing"], env)
    assert result.returncode in (2, 3) and "someone/missing" in result.stderr


@pytest.mark.slow
def test_a_diffusers_folder_is_imported_by_its_weights_file(home, tmp_path):
    folder = tmp_path / "my-lcm-lora"
    folder.mkdir()
    shutil.copy(
        home / "autoimport" / "lora" / "watercolor.safetensors", folder / "pytorch_lora_weights.safetensors"
    )
    result = run_cli(["loras", "import", str(folder)], lorafleet_env(home, None))
    assert result.returncode == 0, result.stderr
    assert (home / "autoimport" / "lora" / "my-lcm-lora.safetensors").is_file()


def test_the_sdk_imports_a_download_for_the_fleet(settings, site):
    from lorafleet.common.catalog.shared_files import LoraRegistry
    from lorafleet.producer import Client

    body = lora_bytes(settings.home)
    site.file("/files/anime.safetensors", body)
    with Client(settings) as client:
        result = client.import_lora(f"{site.url}/files/anime.safetensors")
        assert result.info.name == "anime" and result.stored_as == f"loras/{result.info.sha256}.safetensors"
        assert LoraRegistry(client.redis).lookup_lora("anime").sha256 == hashlib.sha256(body).hexdigest()
        handle = client.submit({"model": "tiny-sd15", "prompt": "x", "loras": [{"name": "anime"}]})
        assert handle.job.loras[0].sha256 == result.info.sha256


def test_the_api_imports_from_public_sources_only(settings, site):
    from fastapi.testclient import TestClient

    from lorafleet.producer.api import create_app

    site.file("/files/ink.safetensors", lora_bytes(settings.home))
    url = f"{site.url}/files/ink.safetensors"
    with TestClient(create_app(settings)) as api:
        refused = api.post("/v1/loras", json={"source": url})
        assert refused.status_code == 422 and "not a public address" in refused.text
        for path in (str(settings.lora_dir / "watercolor.safetensors"), "~0", "~/x.safetensors"):
            local = api.post("/v1/loras", json={"source": path})
            assert local.status_code == 422 and "the server's own files are not offered" in local.text
    site.routes["/hop"] = (302, {"Location": url}, b"")
    only_localhost = settings.model_copy(update={"api_import_hosts": "localhost"})
    with TestClient(create_app(only_localhost)) as api:  # every hop is checked, not just the first
        hop = api.post("/v1/loras", json={"source": f"http://localhost:{site.server.server_port}/hop"})
        assert hop.status_code == 422 and "127.0.0.1 resolves to 127.0.0.1" in hop.text
    allowed = settings.model_copy(update={"api_import_hosts": "127.0.0.1"})
    with TestClient(create_app(allowed)) as api:
        made = api.post("/v1/loras", json={"source": url, "name": "ink-web"})
        assert made.status_code == 201, made.text
        assert made.json()["name"] == "ink-web" and made.json()["stored_as"].startswith("loras/")
        again = api.post("/v1/loras", json={"source": url, "name": "ink-web"})
        assert again.status_code == 201 and again.json()["already_imported"] is True
        bad = api.post("/v1/loras", json={"source": url, "sha256": "nothex"})
        assert bad.status_code == 422
    assert not list((settings.home / "cache" / "downloads").glob(".download-*"))


def test_a_checked_download_connects_to_the_checked_address_not_a_second_lookup(home, site, tmp_path):
    """DNS rebinding: the address the guard approved is the one connected to (the name is
    never looked up again), with the name kept in the Host header."""
    from lorafleet.producer.lora_sources import fetch

    seen = []
    site.file("/f.safetensors", lora_bytes(home))

    def approve(url: str) -> str:
        seen.append(url)
        return "127.0.0.1"  # the one address this check approved for the name

    # "lora.invalid" resolves nowhere: only a connection pinned to the approved address works.
    fetched = fetch(f"http://lora.invalid:{site.server.server_port}/f.safetensors", tmp_path, remote=approve)
    assert fetched.path.read_bytes() == lora_bytes(home) and seen == [
        f"http://lora.invalid:{site.server.server_port}/f.safetensors"
    ]
    fetched.discard()


def test_addresses_that_embed_private_ipv4_are_not_public():
    from lorafleet.common.infra.net import is_public_address

    for address in (
        "127.0.0.1",
        "10.0.0.1",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "fc00::1",
    ):
        assert not is_public_address(address), address
    assert is_public_address("93.184.216.34") and is_public_address("2606:2800:220:1:248:1893:25c8:1946")


def test_a_store_that_fails_leaves_neither_a_file_nor_a_name(settings, site, tmp_path):
    from lorafleet.common.catalog.shared_files import LoraRegistry
    from lorafleet.common.schema.errors import TransientError
    from lorafleet.producer import Client

    site.file("/files/late.safetensors", lora_bytes(settings.home))
    blocked = tmp_path / "store-is-a-file"
    blocked.write_text("no folder can be made under a file")
    broken = settings.model_copy(update={"storage_url": str(blocked)})
    with Client(broken) as client, pytest.raises(TransientError):
        client.import_lora(f"{site.url}/files/late.safetensors")
    assert not (settings.lora_dir / "late.safetensors").exists()
    with Client(settings) as client:
        assert LoraRegistry(client.redis).lookup_lora("late") is None
    assert leftovers(settings.home) == []


@pytest.mark.slow
def test_hub_sources_are_capped_checked_and_leave_no_cache(settings, site, tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from lorafleet.producer.api import create_app

    body = lora_bytes(settings.home)
    site.hub_repo("acme/big", {"huge.safetensors": body})
    tree = json.loads(site.routes["/api/models/acme/big/tree/main"][2])
    tree[0]["size"] = 7 * 1024**3  # the hub says it is a 7 GB checkpoint
    site.routes["/api/models/acme/big/tree/main"] = (
        200,
        {"Content-Type": "application/json"},
        json.dumps(tree).encode(),
    )
    site.hub_repo("acme/small", {"style.safetensors": body})
    env = lorafleet_env(
        settings.home, None, HF_ENDPOINT=site.url, HF_HOME=str(tmp_path / "hf"), HF_HUB_DISABLE_XET="1"
    )
    big = run_cli(["loras", "import", "acme/big"], env)
    assert big.returncode == 2 and "over the 4 GiB cap" in big.stderr
    small = run_cli(["loras", "import", "acme/small"], env)
    assert small.returncode == 0, small.stderr
    assert leftovers(settings.home) == [] and not list((tmp_path / "hf").rglob("*.safetensors"))
    with TestClient(create_app(settings)) as api:
        for source in ("a/b..c", "a/b--c", "a/b/../../x.safetensors"):
            answer = api.post("/v1/loras", json={"source": source})
            assert answer.status_code == 422, (source, answer.text)


@pytest.mark.slow
def test_a_name_too_long_for_a_file_is_refused(home, site):
    site.file(
        "/f",
        lora_bytes(home),
        **{"Content-Disposition": 'attachment; filename="' + "x" * 300 + '.safetensors"'},
    )
    result = run_cli(["loras", "import", f"{site.url}/f"], lorafleet_env(home, None))
    assert result.returncode == 2 and "--name" in result.stderr and "at most 200" in result.stderr
    assert leftovers(home) == []


def test_a_hub_that_cannot_be_reached_is_a_transient_error_naming_the_source(tmp_path, monkeypatch):
    """huggingface_hub's transport errors (httpx's, not OSError) are told as such, not raised
    raw: the API answered 500 to POST /v1/loras {"source": "0/0"} with no network."""
    import huggingface_hub.constants

    from lorafleet.common.schema.errors import TransientError
    from lorafleet.producer.lora_sources import fetch

    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(TransientError, match="hub: acme/lora could not be fetched"):
        fetch("acme/lora", tmp_path / "scratch")
    assert list((tmp_path / "scratch").iterdir()) == []  # nothing left behind
