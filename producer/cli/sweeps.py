"""`lorafleet sweep SPEC` (a base job and axes, one batch, a grid when it ends) and
`lorafleet fetch BATCH --out DIR` (every image and grid of a batch, and a manifest)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.common.infra.storage import open_storage
from lorafleet.common.schema.errors import BadArgument
from lorafleet.common.services.sweeps import read_layout
from lorafleet.producer.cli.jobs import (
    BatchId,
    Json,
    RequireWorker,
    Timeout,
    Wait,
    _client,
    follow,
)
from lorafleet.producer.cli.terminal import console, run, safe


def _read_spec(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BadArgument(f"cannot read {path}: {exc.strerror or exc}", field="SPEC") from None
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise their own kinds
        raise BadArgument(
            f"{path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {exc}", field="SPEC"
        ) from None
    if not isinstance(data, dict):
        raise BadArgument(f"{path} holds no sweep", field="SPEC", allowed="a mapping: base, x, y?, z?")
    return _with_images(data, path.parent)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def _with_images(data: dict, folder: Path) -> dict:
    """The spec with its image files uploaded: the base's ``init_image`` / ``mask_image`` and
    an ``init_image`` axis's values (files, or folders of images), paths relative to the spec."""
    from lorafleet.common.schema.inputs import IMAGE_REF

    client = None

    def upload(value, where: str) -> tuple[str, str]:
        nonlocal client
        if not isinstance(value, str) or IMAGE_REF.match(value):
            return value, str(value)
        file = _beside(folder, value)
        if not file.is_file():
            raise BadArgument(f"{value!r} is neither a file nor a stored image", field=where)
        client = client or _client()
        return client.upload_image(file, field=where), file.name

    base = data.get("base")
    if isinstance(base, dict):
        for name in ("init_image", "mask_image"):
            if name in base:
                base[name] = upload(base[name], f"base.{name}")[0]
        for n, unit in enumerate(base.get("controlnets") or []):
            if isinstance(unit, dict) and "image" in unit:
                unit["image"] = upload(unit["image"], f"base.controlnets[{n}].image")[0]
        ip = base.get("ip_adapter")
        if isinstance(ip, dict) and isinstance(ip.get("images"), list):
            ip["images"] = [upload(i, f"base.ip_adapter.images[{n}]")[0] for n, i in enumerate(ip["images"])]
    for letter in "xyz":
        axis = data.get(letter)
        if (
            not isinstance(axis, dict)
            or axis.get("name") != "init_image"
            or not isinstance(axis.get("values"), list)
        ):
            continue
        files: list = []
        for value in axis["values"]:
            where = _beside(folder, value) if isinstance(value, str) else None
            if where is not None and where.is_dir():  # absolute paths: joined to the folder, they stay
                files += sorted(
                    str(p.absolute()) for p in where.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                )
            else:
                files.append(value)
        uploaded = [upload(value, f"{letter}.values") for value in files]
        axis["values"] = [ref for ref, _ in uploaded]
        axis.setdefault("labels", [label for _, label in uploaded])
    return data


def _beside(folder: Path, value: str) -> Path:
    """A path the sweep file gives: ``~`` expanded, relative ones from the file's folder."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else folder / path


def sweep(
    spec: Annotated[Path, typer.Argument(help="The sweep: a .yaml or .json file with base, x, y, z.")],
    batch_id: BatchId = None,
    require_worker: RequireWorker = False,
    wait: Wait = False,
    timeout: Timeout = None,
    as_json: Json = False,
) -> None:
    """Queue a sweep (a base job and up to three axes) as one batch; its grid is drawn when it ends."""

    def action():
        client = _client()
        handles = client.sweep(_read_spec(spec), batch_id=batch_id, require_worker=require_worker)
        follow(client, handles, wait, timeout, as_json)

    run(action)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(
    batch_id: Annotated[str, typer.Argument(help="The batch (or sweep) to download.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write the images, grids and manifest into.")],
) -> None:
    """Download every image and grid of a batch (skipping files already there with the right
    hash) and write manifest.jsonl: one line per image with its job, axis values, parameters,
    sha256 and path."""

    def action():
        client = _client()
        records = client.batch(batch_id)
        if not records:
            raise BadArgument(f"no batch {batch_id!r}", field="BATCH_ID")
        storage = open_storage(client.settings)
        out.mkdir(parents=True, exist_ok=True)
        fetched = skipped = 0
        lines = []
        for record in records:
            for index, image in enumerate(record.images):
                path = out / record.job_id / f"{index}.png"
                if path.is_file() and _sha256(path) == image.sha256:
                    skipped += 1
                else:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(storage.get(image.key))
                    fetched += 1
                axes = {
                    k: v
                    for k, v in record.job.tags.items()
                    if k.startswith("sweep.") and not k.endswith(".index")
                }
                lines.append(
                    {
                        "job_id": record.job_id,
                        "index": index,
                        "axes": axes,
                        "parameters": record.job.model_dump(mode="json"),
                        "seed": image.seed,
                        "sha256": image.sha256,
                        "path": str(path.relative_to(out)),
                    }
                )
        layout = read_layout(client.redis, batch_id)
        for key in layout["grids"] if layout else []:
            (out / Path(key).name).write_bytes(storage.get(key))
            fetched += 1
        (out / "manifest.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
        console.print(
            f"{fetched} files fetched, {skipped} already there, manifest of {len(lines)} images: "
            f"{safe(str(out / 'manifest.jsonl'))}",
            markup=False,
        )

    run(action)
