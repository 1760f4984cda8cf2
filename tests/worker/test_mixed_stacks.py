"""Jobs with different LoRA stacks in one sampling call, on side paths (through the runner):
each job's pixels are those of the same job run alone in the same mode, and the mode is on
its record and in its PNG."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lorafleet.common.schema.errors import JobRejected
from lorafleet.common.schema.jobs import JobStatus, LoraMode
from lorafleet.producer import Client
from tests.conftest import TINY
from tests.worker.conftest import make_runner, snapshot

JOB = {"model": TINY, "prompt": "a lighthouse at night", "seed": 7, "steps": 3, "cfg_scale": 5}
STACKS = (
    [{"name": "watercolor", "weight": 0.8}],
    [{"name": "ink-sketch", "weight": 0.6}],
    [{"name": "texture-locon", "weight": 0.9}, {"name": "watercolor", "weight": 0.3}],
    [],
)


@pytest.fixture
def side_settings(settings):
    return settings.model_copy(update={"lora_mode": LoraMode.side, "max_batch": 4})


@pytest.fixture
def client(side_settings):
    with Client(side_settings) as c:
        yield c


def _array(runner, record, index: int = 0) -> np.ndarray:
    data = runner.storage.get(record.images[index].key)
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def _weights(runner) -> dict[str, torch.Tensor]:
    return snapshot(runner.pipelines.get(runner.models.get(TINY))[0])


def test_jobs_of_different_stacks_share_calls_and_each_equals_itself_alone(client, side_settings):
    runner = make_runner(side_settings)
    handles = [client.submit(JOB | {"seed": 7 + n, "loras": stack}) for n, stack in enumerate(STACKS)]
    assert runner.run(handles[0].job_id) is JobStatus.succeeded
    together = [client.get(h.job_id) for h in handles]
    assert all(r.status is JobStatus.succeeded for r in together), [r.error for r in together]
    assert all(r.attempts == 1 and r.job.lora_mode is LoraMode.side for r in together)
    before = _weights(runner)
    for n, record in enumerate(together):
        alone = client.submit(JOB | {"seed": 7 + n, "loras": STACKS[n]})
        assert runner.run(alone.job_id) is JobStatus.succeeded
        single = client.get(alone.job_id)
        assert single.timings.batch_size == record.timings.batch_size == 4
        assert np.array_equal(_array(runner, single), _array(runner, record)), STACKS[n]
    after = _weights(runner)
    assert all(torch.equal(before[k], after[k]) for k in before)  # side paths never write weights
    text = Image.open(io.BytesIO(runner.storage.get(together[0].images[0].key))).text["parameters"]
    assert "Batch size: 4, LoRA mode: side" in text
    from lorafleet.producer.api.views import resubmit_command

    assert "--lora-mode side" in resubmit_command(together[0].job)


def test_a_side_path_image_is_the_merged_one_up_to_rounding_and_regenerates_exactly(
    client, side_settings, settings, tmp_path
):
    runner = make_runner(side_settings)
    side = client.submit(JOB | {"loras": STACKS[2]})
    merged = client.submit(JOB | {"loras": STACKS[2], "lora_mode": "merge"})
    plain = client.submit(JOB)
    for handle in (side, merged, plain):
        assert runner.run(handle.job_id) is JobStatus.succeeded
    side_record, merged_record = client.get(side.job_id), client.get(merged.job_id)
    difference = np.abs(_array(runner, side_record) - _array(runner, merged_record)).max()
    assert difference <= 2  # the two modes differ only by float rounding
    assert np.abs(_array(runner, side_record) - _array(runner, client.get(plain.job_id))).max() > 10
    png = tmp_path / "side.png"
    png.write_bytes(runner.storage.get(side_record.images[0].key))
    with Client(settings) as merging:  # a fleet that merges by default: the PNG's mode wins
        job = merging.job_from_png(png)
        assert job.lora_mode is LoraMode.side
        again = merging.submit(job)
    assert runner.run(again.job_id) is JobStatus.succeeded
    assert np.array_equal(_array(runner, client.get(again.job_id)), _array(runner, side_record))


def test_a_stack_without_side_paths_runs_merged_or_is_refused_when_side_is_asked(client, home):
    from safetensors.torch import load_file, save_file

    folder = home / "autoimport" / "lora"
    layer = next(k for k in load_file(str(folder / "watercolor.safetensors")) if "lora_unet" in k)
    prefix = layer.split(".lora_")[0]
    generator = torch.Generator().manual_seed(0)
    loha = {
        f"{prefix}.{name}": torch.randn(shape, generator=generator) * 0.01
        for name, shape in (
            ("hada_w1_a", (32, 4)),
            ("hada_w1_b", (4, 32)),
            ("hada_w2_a", (32, 4)),
            ("hada_w2_b", (4, 32)),
        )
    } | {f"{prefix}.alpha": torch.tensor(4.0)}
    save_file(loha, str(folder / "hadamard.safetensors"))
    handle = client.submit(JOB | {"loras": [{"name": "hadamard", "weight": 0.5}]})
    record = client.get(handle.job_id)
    assert record.job.lora_mode is LoraMode.merge
    assert any("lycoris-loha file, which has no side path: the job runs merged" in w for w in record.warnings)
    with pytest.raises(JobRejected) as refused:
        client.submit(JOB | {"loras": [{"name": "hadamard", "weight": 0.5}], "lora_mode": "side"})
    assert refused.value.field == "lora_mode" and "no side path" in refused.value.message


def _tucker_locon(home) -> None:
    """A LoCon whose 3x3 layer is Tucker-factored (lora_mid): the same format name as a plain
    LoCon at submit, but no side path at the worker."""
    from safetensors.torch import load_file, save_file

    folder = home / "autoimport" / "lora"
    state = load_file(str(folder / "texture-locon.safetensors"))
    down = next(k for k, t in state.items() if k.endswith(".lora_down.weight") and t.shape[2:] == (3, 3))
    prefix = down[: -len(".lora_down.weight")]
    rank, channels = state[down].shape[0], state[down].shape[1]
    generator = torch.Generator().manual_seed(1)
    state[f"{prefix}.lora_mid.weight"] = torch.randn(rank, rank, 3, 3, generator=generator) * 0.01
    state[down] = torch.randn(rank, channels, 1, 1, generator=generator) * 0.01
    save_file(state, str(folder / "tucker.safetensors"), metadata={"ss_base_model_version": "sd_v1"})


def test_a_job_whose_stack_has_no_side_path_fails_alone_and_its_companions_go_on(client, side_settings, home):
    _tucker_locon(home)
    runner = make_runner(side_settings)
    good = client.submit(JOB | {"loras": STACKS[0]})
    tucker = client.submit(JOB | {"seed": 8, "loras": [{"name": "tucker", "weight": 0.5}]})
    other = client.submit(JOB | {"seed": 9, "loras": STACKS[1]})
    assert client.get(tucker.job_id).job.lora_mode is LoraMode.side  # its format name passed submit
    assert runner.run(good.job_id) is JobStatus.succeeded
    failed = client.get(tucker.job_id)
    assert failed.status is JobStatus.failed and "lora_mode merge" in failed.error, failed.error
    assert "no side path" in failed.error
    assert client.get(other.job_id).status is JobStatus.succeeded
    hot, _ = runner.pipelines.get(runner.models.get(TINY))
    assert hot.patcher.is_pristine
