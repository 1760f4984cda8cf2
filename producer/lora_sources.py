"""Where LoRA files come from: a local file, a diffusers folder, a download link, a hub repo.

``fetch`` turns what a user pastes into a local .safetensors file ready for the same checks
and import as a file copied by hand:

- a local ``.safetensors`` file, as it is;
- a local diffusers-format folder (``pytorch_lora_weights.safetensors`` and its metadata),
  the format InvokeAI's LoRA guidance installs LCM-LoRAs in;
- an ``http(s)://`` URL (Civitai's download links answer with a redirect and a
  ``Content-Disposition`` file name): streamed to disk under a size cap, its sha256 computed
  while streaming and checked against the one given;
- a hub repo ``owner/repo`` (its one LoRA file, or ``pytorch_lora_weights.safetensors``) or
  ``owner/repo/file.safetensors``, through huggingface_hub (which reads ``HF_ENDPOINT``).

Nothing is left behind when a fetch fails; the error names the source and what happened
(HTTP status, size cap, hash mismatch, a web page instead of a file).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from lorafleet.common.catalog.lora_files import MAX_LORA_BYTES, SAFETENSORS_SUFFIX, sha256_file
from lorafleet.common.infra.net import checked_address, send_pinned
from lorafleet.common.schema.errors import BadArgument, TransientError

DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file name diffusers' save_lora_weights writes (and hub LCM-LoRA repos hold)."""
GENERIC_WEIGHTS = {
    DIFFUSERS_WEIGHTS,
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
}
"""File names diffusers gives every repo's weights: an import names the file after its repo."""
HUB_SOURCE = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(/[\w./-]+\.safetensors)?$")
CHUNK = 1024 * 1024
TIMEOUT_SECONDS = 30.0
"""Seconds without a byte before a download is given up."""
FIELD = "SOURCE"

Progress = Callable[[int, int | None], None]
"""Called with (bytes so far, total bytes or None) while a download streams."""
UrlCheck = Callable[[str], "str | None"]
"""Called with every URL a download requests (each redirect too) before any connection;
raises to refuse it, or returns the one address to connect to (None: resolve as usual)."""
MAX_REDIRECTS = 10


def public_hosts_only(allowed: set[str]) -> UrlCheck:
    """A UrlCheck for downloads made on behalf of remote clients (the HTTP API): a host must
    resolve only to public addresses, unless it is one of ``allowed``, so that a client
    cannot make the server fetch from its own network (server-side request forgery). The
    address checked is the one connected to, so a name that resolves differently the
    second time (DNS rebinding) changes nothing."""

    def check(url: str) -> str | None:
        if (urlsplit(url).hostname or "") in allowed:
            return None
        return checked_address(
            url,
            error=BadArgument,
            field="source",
            allowed="a public http(s) URL, a hub repo, or a host listed in LORAFLEET_API_IMPORT_HOSTS",
        )

    return check


@dataclass
class Fetched:
    """A LoRA file on local disk, the name its source suggests, and whether it is a temporary copy."""

    path: Path
    suggested_name: str
    temporary: bool
    sha256: str | None = None
    """Computed while downloading; None for a file that was already here."""
    cleanup: Path | None = None
    """A folder the fetch made for it, removed with it."""

    def discard(self) -> None:
        if self.temporary:
            self.path.unlink(missing_ok=True)
        if self.cleanup is not None:
            shutil.rmtree(self.cleanup, ignore_errors=True)


def fetch(
    source: str,
    scratch: Path,
    *,
    sha256: str | None = None,
    progress: Progress | None = None,
    remote: UrlCheck | None = None,
) -> Fetched:
    """The LoRA ``source`` names, as a local file (a temporary one under ``scratch`` for
    downloads); BadArgument or TransientError say why not.

    ``remote``: the source comes from a remote client; local files and folders are refused
    and every URL requested passes this check first.
    """
    if sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", sha256):
        raise BadArgument(f"{sha256!r} is not a sha256", field="--sha256", allowed="64 hex digits")
    is_url = urlsplit(source).scheme in ("http", "https")
    if remote is not None and not (is_url or HUB_SOURCE.match(source)):
        raise BadArgument(
            f"{source!r} is not a URL or a hub repo",
            field="source",
            allowed="an http(s) URL or owner/repo[/file.safetensors]: the server's own files are not offered",
        )
    local = _local_path(source) if remote is None else None
    if local is not None and local.is_dir():
        fetched = _from_folder(local)
    elif local is not None and local.is_file():
        fetched = Fetched(local, local.stem, temporary=False)
    elif is_url:
        fetched = _download(source, scratch, progress, remote)
    elif HUB_SOURCE.match(source):
        fetched = _from_hub(source, scratch)
    else:
        raise BadArgument(
            f"{source!r} is no file, folder, URL or hub repo",
            field=FIELD,
            allowed="a .safetensors file, a diffusers LoRA folder, an http(s) URL, owner/repo or owner/repo/file",
        )
    if sha256 is not None:
        actual = fetched.sha256 or sha256_file(fetched.path)
        if actual != sha256.lower():
            fetched.discard()
            raise BadArgument(
                f"{source} has sha256 {actual}, not the {sha256.lower()} asked for", field="--sha256"
            )
    return fetched


def _local_path(source: str) -> Path | None:
    """``source`` as a path on this machine (``~`` expanded), or None if it cannot be one."""
    try:
        return Path(source).expanduser()
    except (RuntimeError, ValueError):  # "~nobody": no such user's home
        return None


def _from_folder(folder: Path) -> Fetched:
    weights = folder / DIFFUSERS_WEIGHTS
    if weights.is_file():
        return Fetched(weights, folder.name, temporary=False)
    found = sorted(folder.glob(f"*{SAFETENSORS_SUFFIX}"))
    if len(found) == 1:
        return Fetched(found[0], found[0].stem, temporary=False)
    raise BadArgument(
        f"{folder} holds {len(found)} .safetensors files and no {DIFFUSERS_WEIGHTS}",
        field=FIELD,
        allowed=f"a diffusers LoRA folder ({DIFFUSERS_WEIGHTS}) or a folder with one .safetensors file",
    )


def _name_from_headers(url: str, disposition: str | None) -> str:
    """The file name a download suggests: Content-Disposition's (RFC 6266), else the URL's last part."""
    if disposition:
        if match := re.search(r"filename\*\s*=\s*[^']*''([^;]+)", disposition, re.IGNORECASE):
            return Path(unquote(match.group(1).strip().strip('"'))).name
        if match := re.search(r'filename\s*=\s*"?([^";]+)"?', disposition, re.IGNORECASE):
            return Path(match.group(1).strip()).name
    return Path(unquote(urlsplit(url).path)).name or "download"


def _open(http, url: str, check: UrlCheck | None):
    """GET ``url`` as a stream, following redirects by hand so that every hop is checked and,
    when the check pins an address, connected to that address (Host and TLS name kept)."""
    import httpx

    for _ in range(MAX_REDIRECTS + 1):
        address = check(url) if check is not None else None
        response = send_pinned(http, "GET", url, address, stream=True)
        if not response.is_redirect:
            return response
        location = response.headers.get("location", "")
        response.close()
        url = str(httpx.URL(url).join(location))
    raise BadArgument(f"{url}: more than {MAX_REDIRECTS} redirects", field=FIELD)


def _download(url: str, scratch: Path, progress: Progress | None, check: UrlCheck | None) -> Fetched:
    """Stream ``url`` into a temporary file, within the size cap."""
    import httpx

    scratch.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=scratch, prefix=".download-", suffix=SAFETENSORS_SUFFIX)
    path = Path(tmp)
    try:
        with (
            os.fdopen(fd, "wb") as out,
            httpx.Client(follow_redirects=False, timeout=TIMEOUT_SECONDS) as http,
        ):
            r = _open(http, url, check)
            try:
                digest = _receive(r, url, out, progress)
                name = _name_from_headers(str(r.url), r.headers.get("content-disposition"))
            finally:
                r.close()
    except httpx.HTTPError as exc:
        path.unlink(missing_ok=True)
        raise TransientError(f"download of {url} failed: {exc}") from None
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    stem = name[: -len(SAFETENSORS_SUFFIX)] if name.lower().endswith(SAFETENSORS_SUFFIX) else Path(name).stem
    return Fetched(path, stem or "download", temporary=True, sha256=digest.hexdigest())


def _receive(r, url: str, out, progress: Progress | None):
    """Check the answer and write its body to ``out``; returns its running sha256."""
    if r.status_code >= 500 or r.status_code == 429:
        raise TransientError(f"{url} answered HTTP {r.status_code}; try again later")
    if r.status_code >= 400:
        raise BadArgument(f"{url} answered HTTP {r.status_code} {r.reason_phrase}", field=FIELD)
    kind = r.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind in ("text/html", "application/xhtml+xml"):
        raise BadArgument(
            f"{url} answered a web page ({kind}), not a .safetensors file: a login or a "
            "'download' page? Use the file's direct download link",
            field=FIELD,
        )
    length = r.headers.get("content-length")
    total = int(length) if length and length.isdigit() else None
    if total is not None and total > MAX_LORA_BYTES:
        raise BadArgument(
            f"{url} is {total / 1024**3:.1f} GiB, over the {MAX_LORA_BYTES // 1024**3} GiB cap", field=FIELD
        )
    received, digest = 0, hashlib.sha256()
    for chunk in r.iter_bytes(CHUNK):
        received += len(chunk)
        if received > MAX_LORA_BYTES:
            raise BadArgument(f"{url} sent more than the {MAX_LORA_BYTES // 1024**3} GiB cap", field=FIELD)
        digest.update(chunk)
        out.write(chunk)
        if progress:
            progress(received, total)
    return digest


def _from_hub(source: str, scratch: Path) -> Fetched:
    """``owner/repo`` (its one LoRA file) or ``owner/repo/path/file.safetensors``, via
    huggingface_hub: its size checked against the cap before anything is downloaded, and
    downloaded into ``scratch`` (removed afterwards), not into the hub's cache."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )
    from huggingface_hub.errors import HTTPError as HubTransportError  # no connection, a timeout
    from huggingface_hub.utils import validate_repo_id

    owner, repo, *rest = source.split("/")
    repo_id, filename = f"{owner}/{repo}", "/".join(rest) or None
    try:  # refused here, before any request: a bad name never reaches the hub
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise BadArgument(f"hub: {repo_id!r} is not a valid repo id ({exc})", field=FIELD) from None
    if any(part in ("", ".", "..") for part in rest):
        raise BadArgument(f"hub: {source!r} has an empty, '.' or '..' path segment", field=FIELD)
    scratch.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(dir=scratch, prefix=".hub-"))
    try:
        sizes = {
            f.path: f.size
            for f in HfApi().list_repo_tree(repo_id, recursive=True)
            if getattr(f, "size", None) is not None and f.path.endswith(SAFETENSORS_SUFFIX)
        }
        if filename is None:
            files = sorted(sizes)
            if DIFFUSERS_WEIGHTS in files:
                filename = DIFFUSERS_WEIGHTS
            elif len(files) == 1:
                filename = files[0]
            else:
                raise BadArgument(
                    f"hub repo {repo_id} holds {len(files)} .safetensors files and no {DIFFUSERS_WEIGHTS}",
                    field=FIELD,
                    allowed="owner/repo/FILE with one of: " + (", ".join(files[:10]) or "none"),
                )
        if filename not in sizes:
            raise BadArgument(f"hub: {repo_id} has no file {filename!r}", field=FIELD)
        if sizes[filename] > MAX_LORA_BYTES:
            cap = MAX_LORA_BYTES // 1024**3
            raise BadArgument(
                f"hub: {source} is {sizes[filename] / 1024**3:.1f} GiB, over the {cap} GiB cap", field=FIELD
            )
        path = Path(hf_hub_download(repo_id, filename, local_dir=folder))
    except BaseException as exc:
        shutil.rmtree(folder, ignore_errors=True)
        if isinstance(exc, (RepositoryNotFoundError, EntryNotFoundError)):
            raise BadArgument(f"hub: {source} not found ({type(exc).__name__})", field=FIELD) from None
        if isinstance(exc, (HFValidationError, ValueError)) and not isinstance(exc, BadArgument):
            raise BadArgument(
                f"hub: {source!r} is not a valid repo or file name ({exc})", field=FIELD
            ) from None
        if isinstance(exc, (HfHubHTTPError, HubTransportError, LocalEntryNotFoundError, OSError)):
            raise TransientError(f"hub: {source} could not be fetched: {exc}") from None
        raise
    name = repo if Path(filename).name in GENERIC_WEIGHTS else Path(filename).stem
    return Fetched(path, name, temporary=True, cleanup=folder)
