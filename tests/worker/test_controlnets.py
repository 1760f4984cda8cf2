"""ControlNets: a job with a control map (and a LoRA) gives the image of diffusers' own ControlNet
pipelines from the same map and seed, alone or with an init image, on the tiny SD1.5 and SDXL;
jobs with different maps share a call; the PNG names the unit as A1111 writes it, with its map,
and regenerates pixel for pixel; a ControlNet that names nothing, or fits another family, is
refused at submit naming the field."""

# ruff: noqa: F811  (client and reference are fixtures imported from other test modules)

from __future__ import annotations

import io
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.infotext import parse_parameters
from lorafleet.common.schema.jobs import JobStatus
from lorafleet.worker.tiny import make_tiny_controlnet, make_tiny_model
from tests.conftest import TINY
from tests.worker.test_images_in import (  # noqa: F401
    JOB,
    LORA,
    XL_LORA,
    decoded,
    merge_peft,
    photo,
    reference,
    sdxl_pipeline,
    submitted,
    with_xl_lora,
    xl_lora_file,
)
from tests.worker.test_runner import client  # noqa: F401  (a fixture)

CN = "tiny-canny"


@pytest.fixture(scope="module")
def controlnet_folder(template_home, tmp_path_factory):
    return make_tiny_controlnet(template_home / "models" / TINY, tmp_path_factory.mktemp("cn") / CN)


@pytest.fixture
def settings(settings, controlnet_folder):  # conftest's, with the ControlNet dropped in
    shutil.copytree(controlnet_folder, settings.controlnet_dir / CN)
    return settings


def control_map(seed: int) -> bytes:
    """An edge-map-like image: white strokes on black."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((64, 64, 3), dtype=np.uint8)
    for _ in range(6):
        row, col = rng.integers(0, 60, 2)
        pixels[row : row + 3, :] = 255 if rng.random() < 0.5 else 0
        pixels[:, col : col + 3] = 255
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def says_its_unit_and_regenerates(client, runner, png: bytes, unit: dict, weight: float, tmp_path) -> None:
    """The PNG carries the job's ``ControlNet 0`` unit as A1111's extension writes it (a
    T2I-Adapter's too) and its map's name, and --from-png gives the same pixels again."""
    fields = parse_parameters(Image.open(io.BytesIO(png)).info["parameters"]).fields
    assert fields["ControlNet 0"].startswith(f"Module: none, Model: {unit['model']} [")
    assert f"Weight: {weight:g}" in fields["ControlNet 0"]
    assert fields["ControlNet 0 image"] == unit["image"]
    path = tmp_path / "controlled.png"
    path.write_bytes(png)
    again = client.submit(client.job_from_png(path))
    runner.run(again.job_id)
    redone = client.get(again.job_id)
    assert [(c.model, c.weight) for c in redone.job.controlnets] == [(unit["model"], weight)]
    assert np.array_equal(decoded(runner.storage.get(redone.images[0].key)), decoded(png))


def diffusers_controlnet_image(pipe, folder, control: bytes, init: bytes | None = None, weight: float = 1.0):
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image, ControlNetModel

    controlnet = ControlNetModel.from_pretrained(str(folder))
    kind = AutoPipelineForImage2Image if init is not None else AutoPipelineForText2Image
    derived = kind.from_pipe(pipe, controlnet=controlnet)
    derived.set_progress_bar_config(disable=True)
    mapped = Image.open(io.BytesIO(control)).convert("RGB")
    arguments = dict(
        prompt=JOB["prompt"],
        guidance_scale=7.0,
        num_inference_steps=JOB["steps"],
        generator=torch.Generator("cpu").manual_seed(JOB["seed"]),
        controlnet_conditioning_scale=weight,
    )
    if init is None:
        arguments |= {"image": mapped, "width": 64, "height": 64}
    else:
        arguments |= {
            "image": Image.open(io.BytesIO(init)).convert("RGB"),
            "control_image": mapped,
            "strength": 0.7,
        }
    return np.asarray(derived(**arguments).images[0].convert("RGB")).astype(int)


def test_a_controlnet_job_with_a_lora_gives_diffusers_own_image_and_its_png_regenerates(
    client,
    runner,
    reference,
    controlnet_folder,
    tmp_path,  # noqa: F811
):
    mapped = control_map(1)
    unit = {"model": CN, "image": client.upload_image(mapped), "weight": 0.9}
    record, png = submitted(client, runner, controlnets=[unit], width=64, height=64)
    want = diffusers_controlnet_image(reference, controlnet_folder, mapped, weight=0.9)
    assert np.abs(decoded(png) - want).max() <= 2
    plain, _ = submitted(client, runner, width=64, height=64)
    assert np.abs(decoded(runner.storage.get(plain.images[0].key)) - decoded(png)).max() > 10
    says_its_unit_and_regenerates(client, runner, png, unit, 0.9, tmp_path)


def test_a_controlnet_on_an_init_image_gives_diffusers_own_image(
    client, runner, reference, controlnet_folder
):  # noqa: F811
    mapped, init = control_map(2), photo(3)
    unit = {"model": CN, "image": client.upload_image(mapped)}
    _, png = submitted(client, runner, controlnets=[unit], init_image=client.upload_image(init), strength=0.7)
    want = diffusers_controlnet_image(reference, controlnet_folder, mapped, init=init)
    assert np.abs(decoded(png) - want).max() <= 2


def test_jobs_with_different_control_maps_share_a_call_and_keep_their_pixels(client, runner):  # noqa: F811
    units = [{"model": CN, "image": client.upload_image(control_map(n))} for n in range(3)]
    stack = {"loras": [{"name": LORA[0], "weight": LORA[1]}], "width": 64, "height": 64}
    alone = []
    for unit in units:
        _, png = submitted(client, runner, controlnets=[unit], width=64, height=64)
        alone.append(decoded(png))
    handles = [client.submit(JOB | stack | {"controlnets": [unit]}) for unit in units]
    runner.run(handles[0].job_id)
    records = [client.get(h.job_id) for h in handles]
    assert all(r.status is JobStatus.succeeded and r.attempts == 1 for r in records)
    for record, want in zip(records, alone):
        assert np.array_equal(decoded(runner.storage.get(record.images[0].key)), want)


def test_a_controlnet_that_names_nothing_or_fits_another_family_is_refused(client, settings, tmp_path):  # noqa: F811
    from tests.producer.test_client import queued_messages

    image = client.upload_image(control_map(4))
    sdxl = make_tiny_model(tmp_path / "tiny-sdxl", family="sdxl")
    make_tiny_controlnet(sdxl, settings.controlnet_dir / "sdxl-canny")
    cases = [
        ({"model": "nowhere", "image": image}, "controlnets[0].model", "nowhere"),
        ({"model": "sdxl-canny", "image": image}, "controlnets[0].model", "made for another model family"),
        ({"model": CN, "image": "sha256:" + "1" * 64}, "controlnets[0].image", "upload it first"),
        ({"model": CN, "image": image, "start": 0.8, "end": 0.2}, "controlnets[0]", "must be before end"),
    ]
    for unit, field, words in cases:
        with pytest.raises(JobRejected) as refused:
            client.submit(JOB | {"controlnets": [unit]})
        assert refused.value.field.startswith(field) and words in str(refused.value), (unit, refused.value)
    assert queued_messages(client) == []


def test_an_sdxl_controlnet_job_with_a_lora_gives_diffusers_own_image(client, runner, settings, xl_lora_file):  # noqa: F811
    make_tiny_model(settings.models_dir / "tiny-sdxl", family="sdxl")
    folder = make_tiny_controlnet(settings.models_dir / "tiny-sdxl", settings.controlnet_dir / "sdxl-canny")
    state = with_xl_lora(settings, xl_lora_file)
    mapped = control_map(5)
    unit = {"model": "sdxl-canny", "image": client.upload_image(mapped)}
    stack = [{"name": XL_LORA[0], "weight": XL_LORA[1]}]
    handle = client.submit(
        JOB | {"model": "tiny-sdxl", "controlnets": [unit], "loras": stack, "width": 64, "height": 64}
    )
    runner.run(handle.job_id)
    record = client.get(handle.job_id)
    assert record.status is JobStatus.succeeded, record.error
    got = decoded(runner.storage.get(record.images[0].key))
    pipe = sdxl_pipeline(settings.models_dir / "tiny-sdxl")
    plain = diffusers_controlnet_image(pipe, folder, mapped)
    merge_peft(pipe, state, XL_LORA[1])
    want = diffusers_controlnet_image(pipe, folder, mapped)
    assert np.abs(got - want).max() <= 2
    assert np.abs(got - plain).max() > 4  # nearer want than diffusers' image without the LoRA


@pytest.mark.slow
def test_the_cli_imports_lists_and_submits_controlnets(
    settings, home, redis_url, client, controlnet_folder, tmp_path
):
    import json

    from lorafleet.common.catalog.input_images import image_ref
    from tests.helpers import lorafleet_env, run_cli

    env = lorafleet_env(home, redis_url, settings.storage_url)
    single = tmp_path / "canny-single.safetensors"
    shutil.copy(controlnet_folder / "diffusion_pytorch_model.safetensors", single)
    imported = run_cli(["controlnets", "import", str(single), "--name", "shared-canny"], env)
    assert imported.returncode == 0 and "registered as 'shared-canny'" in imported.stdout, imported.stderr
    listed = {row["name"]: row for row in json.loads(run_cli(["controlnets", "list", "--json"], env).stdout)}
    assert listed[CN]["cross_attention_dim"] == listed["shared-canny"]["cross_attention_dim"] == 32
    not_one = run_cli(
        ["controlnets", "import", str(home / "autoimport" / "lora" / "watercolor.safetensors")], env
    )
    assert not_one.returncode == 2 and "not a ControlNet" in not_one.stderr
    mapped = control_map(6)
    (tmp_path / "edges.png").write_bytes(mapped)
    out = run_cli(
        [
            "submit",
            "--model",
            TINY,
            "--prompt",
            "x",
            "--controlnet",
            f"{CN},{tmp_path / 'edges.png'},0.7",
            "--json",
        ],
        env,
    )
    assert out.returncode == 0, out.stderr
    [queued] = json.loads(out.stdout)
    [unit] = client.get(queued["job_id"]).job.controlnets
    assert (unit.model, unit.weight, unit.image) == (CN, 0.7, image_ref(mapped))
    bad = run_cli(["submit", "--model", TINY, "--prompt", "x", "--controlnet", f"{CN}"], env)
    assert bad.returncode == 2 and "NAME,IMAGE[,WEIGHT[,START,END]]" in bad.stderr


def test_two_controlnets_on_jobs_sharing_a_call_give_diffusers_own_images(
    client, runner, reference, controlnet_folder, settings
):
    from diffusers import AutoPipelineForText2Image, ControlNetModel
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    shutil.copytree(controlnet_folder, settings.controlnet_dir / "second")
    maps = [[control_map(10 + 2 * n), control_map(11 + 2 * n)] for n in range(2)]
    stack = {"loras": [{"name": LORA[0], "weight": LORA[1]}], "width": 64, "height": 64}
    jobs = [
        JOB
        | stack
        | {
            "seed": 100 + n,
            "controlnets": [
                {"model": CN, "image": client.upload_image(pair[0]), "weight": 0.8},
                {"model": "second", "image": client.upload_image(pair[1]), "weight": 0.5, "end": 0.5},
            ],
        }
        for n, pair in enumerate(maps)
    ]
    handles = [client.submit(job) for job in jobs]
    runner.run(handles[0].job_id)  # both rows in one call, each with its own two maps
    records = [client.get(h.job_id) for h in handles]
    assert all(r.status is JobStatus.succeeded for r in records), [r.error for r in records]
    nets = MultiControlNetModel([ControlNetModel.from_pretrained(str(controlnet_folder)) for _ in range(2)])
    derived = AutoPipelineForText2Image.from_pipe(reference, controlnet=nets)
    derived.set_progress_bar_config(disable=True)
    for n, record in enumerate(records):
        want = derived(
            prompt=JOB["prompt"],
            image=[Image.open(io.BytesIO(m)).convert("RGB") for m in maps[n]],
            controlnet_conditioning_scale=[0.8, 0.5],
            control_guidance_start=[0.0, 0.0],
            control_guidance_end=[1.0, 0.5],
            guidance_scale=7.0,
            num_inference_steps=JOB["steps"],
            width=64,
            height=64,
            generator=torch.Generator("cpu").manual_seed(100 + n),
        ).images[0]
        got = decoded(runner.storage.get(record.images[0].key))
        assert np.abs(got - np.asarray(want.convert("RGB")).astype(int)).max() <= 2
