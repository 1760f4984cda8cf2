"""LoRA stack switching: lorafleet's patcher against the memory-copy limit and diffusers.

An SD1.5-shaped UNet (the real config, random weights; --family sdxl for SDXL's; --shape tiny
for the tests' tiny UNet of that family, a smoke run whose figures mean nothing) and three
kohya-format LoRA files: two "style" LoRAs of rank 32 over attention, feed-forward and proj
layers, and one LCM-LoRA-shaped file of rank 64 that also covers the ResNet convolutions.
Stacks: S1 = style A @ 0.8 + LCM @ 0.35, S2 = style B @ 0.6 + LCM @ 0.35.

Measured in one run, side by side (medians of --repeats):
- the memory-copy limit: copy_ of every parameter S1 touches from a same-shaped buffer;
- the arithmetic alone: S1's summed low-rank products for every touched parameter, into a
  buffer (on a CPU, applying is bound by this, not by memory);
- lorafleet: apply S1 (from pristine), restore S1, switch S1 -> S2;
- diffusers: load_lora_weights + set_adapters + fuse_lora for S1, unfuse_lora +
  unload_lora_weights, and whether that leaves the UNet bit-exact;
- --changes random stack changes through lorafleet's patcher, checked bit-exact against a
  reference for repeated stacks and against the pristine weights at the end, with the
  resident memory (CPU) or allocated device memory after the first and the last change.

Prints a table and one JSON line. Never part of the test run.

    .venv/bin/python bench/lora_switch.py                       # SD1.5 shape, fp32, CPU
    .venv/bin/python bench/lora_switch.py --device cuda --dtype float16 --family sdxl
    .venv/bin/python bench/lora_switch.py --shape tiny --repeats 1 --changes 20   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lorafleet.worker.lora.formats import parse_lora
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher, concatenate_low_rank

SD15 = dict(sample_size=64, cross_attention_dim=768)
SDXL = dict(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    cross_attention_dim=2048,
)
STYLE_LAYERS = (
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".proj_in",
    ".proj_out",
)
LCM_LAYERS = STYLE_LAYERS + (".conv1", ".conv2", ".time_emb_proj", ".conv_shortcut")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def resident_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def build_unet(family: str, shape: str, device: torch.device, dtype: torch.dtype):
    """The family's UNet in its real shapes, or the tiny one of lorafleet.worker.tiny."""
    from diffusers import UNet2DConditionModel

    if shape == "tiny":
        from lorafleet.worker.tiny import make_tiny_model

        with tempfile.TemporaryDirectory() as scratch:
            folder = make_tiny_model(Path(scratch) / "tiny", family=family)
            unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    else:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(**(SDXL if family == "sdxl" else SD15))
    return unet.to(device=device, dtype=dtype).eval()


def write_lora(unet, path: Path, layers, rank: int, seed: int) -> int:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, module in unet.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4) or not name.endswith(layers):
            continue
        out, rest = weight.shape[0], weight[0].numel()
        r = min(rank, out, rest)
        key = "lora_unet_" + name.replace(".", "_")
        down = torch.randn(r, rest, generator=gen) / rest**0.5
        up = torch.randn(out, r, generator=gen) * 0.01
        if weight.dim() == 4:
            down, up = down.reshape(r, *weight.shape[1:]), up.reshape(out, r, 1, 1)
        state[f"{key}.lora_down.weight"] = down.half()
        state[f"{key}.lora_up.weight"] = up.half()
        state[f"{key}.alpha"] = torch.tensor(float(r)).half()
    save_file(state, str(path))
    return len(state) // 3


def snapshot(unet) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in unet.state_dict().items()}


def differing(unet, reference) -> tuple[int, float]:
    count, worst = 0, 0.0
    for key, value in unet.state_dict().items():
        if not torch.equal(value, reference[key]):
            count += 1
            worst = max(worst, (value.float() - reference[key].float()).abs().max().item())
    return count, worst


def bench_lorafleet(unet, files, device, repeats):
    patcher = WeightPatcher({"unet": unet})
    loras = {
        name: parse_lora(load_file(str(p)), patcher.index, "kohya-lora", device=device)
        for name, p in files.items()
    }
    s1 = [StackEntry(loras["style_a"], 0.8, 0.8), StackEntry(loras["lcm"], 0.35, 0.35)]
    s2 = [StackEntry(loras["style_b"], 0.6, 0.6), StackEntry(loras["lcm"], 0.35, 0.35)]
    patcher.apply(s1)  # warm: pristine copies made, workspace allocated
    patcher.restore()
    keys = sorted({d.target.key for entry in s1 for d in entry.lora.deltas})
    params = [patcher.parameter(k) for k in keys]
    buffers = [p.detach().clone() for p in params]
    touched_bytes = sum(p.nbytes for p in params)

    def copy_all():
        for p, b in zip(params, buffers):
            p.detach().copy_(b)

    copy_limit = timed(copy_all, device, repeats)
    patcher.restore()
    buffers.clear()
    # The arithmetic alone: each touched parameter's summed low-rank product, into a buffer.
    plan = patcher.plan(s1)
    scratch = [torch.empty(max(p.numel() for p in params), dtype=torch.float32, device=device)]

    def products():
        for parts in plan.values():
            up, down, _ = concatenate_low_rank(parts)
            torch.mm(up, down, out=scratch[0][: up.shape[0] * down.shape[1]].view(up.shape[0], -1))

    gemm_limit = timed(products, device, repeats)
    flops = sum(
        2 * concatenate_low_rank(parts)[0].numel() * concatenate_low_rank(parts)[1].shape[1]
        for parts in plan.values()
    )
    scratch.clear()
    results = {
        "touched_params": len(keys),
        "touched_bytes": touched_bytes,
        "copy_limit_s": copy_limit,
        "gemm_limit_s": gemm_limit,
        "gemm_flops": flops,
    }

    def apply_then_restore():
        sync(device)
        start = time.perf_counter()
        patcher.apply(s1)
        sync(device)
        middle = time.perf_counter()
        patcher.restore()
        sync(device)
        return middle - start, time.perf_counter() - middle

    pairs = [apply_then_restore() for _ in range(repeats)]
    results["apply_s"] = statistics.median(p[0] for p in pairs)
    results["restore_s"] = statistics.median(p[1] for p in pairs)

    def switch():
        patcher.apply(s1)
        sync(device)
        start = time.perf_counter()
        patcher.apply(s2)
        sync(device)
        return time.perf_counter() - start

    results["switch_s"] = statistics.median(switch() for _ in range(repeats))
    patcher.restore()
    return patcher, loras, results


def _snapshot_bytes(reference: dict[tuple, dict[str, torch.Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for state in reference.values() for t in state.values())


def random_changes(unet, patcher, loras, pristine, device, changes: int, seed: int = 0):
    rng = random.Random(seed)
    names = list(loras)
    # Every parameter any LoRA touches gets its pristine copy now, so memory after this is
    # what the patcher keeps for good; growth from here on would be a leak.
    patcher.apply([StackEntry(loras[n], 1.0, 1.0) for n in names])
    patcher.restore()
    reference: dict[tuple, dict[str, torch.Tensor]] = {}
    checked = mismatches = 0
    first_memory = None
    start = time.perf_counter()
    for step in range(changes):
        picked = rng.sample(names, rng.randint(0, len(names)))
        weights = tuple(rng.choice((0.35, 0.45, 0.6, 0.75, 0.8, 1.0)) for _ in picked)
        patcher.apply([StackEntry(loras[n], w, w) for n, w in zip(picked, weights)])
        key = (tuple(picked), weights)
        if step % 50 == 0 or key in reference:
            state = {
                k: v.detach().clone()
                for k, v in unet.state_dict().items()
                if k in {"conv_in.weight"} or "attn1.to_q" in k
            }
            if key in reference:
                checked += 1
                mismatches += any(not torch.equal(state[k], reference[key][k]) for k in state)
            elif len(reference) < 8:
                reference[key] = state
        if step == 9:
            sync(device)
            # After ten changes: workspaces and caches warm. The reference snapshots this
            # loop keeps for its own checks are not the patcher's: they are left out.
            first_memory = resident_bytes(device) - _snapshot_bytes(reference)
    sync(device)
    elapsed = time.perf_counter() - start
    last_memory = resident_bytes(device) - _snapshot_bytes(reference)
    patcher.restore()
    exact_at_end = differing(unet, pristine)[0] == 0
    return {
        "changes": changes,
        "seconds": elapsed,
        "repeat_checks": checked,
        "repeat_mismatches": mismatches,
        "bit_exact_at_end": exact_at_end,
        "memory_after_10_bytes": first_memory,
        "memory_after_last_bytes": last_memory,
    }


def bench_diffusers(unet, files, device, dtype, repeats, pristine):
    import warnings

    import diffusers
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorafleet.worker.tiny import make_tiny_model

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()
    xl = "add_embedding" in dict(unet.named_modules())
    with tempfile.TemporaryDirectory() as scratch:
        tiny_dir = make_tiny_model(Path(scratch) / "tiny", family="sdxl" if xl else "sd15")
        cls = StableDiffusionXLPipeline if xl else StableDiffusionPipeline
        extra = {} if xl else {"safety_checker": None, "requires_safety_checker": False}
        tiny = cls.from_pretrained(str(tiny_dir), **extra)
    components = {k: v for k, v in tiny.components.items() if k != "unet"}
    pipe = cls(**components, unet=unet, **({"add_watermarker": False} if xl else {})).to(device)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(dtype)

    def load_fuse(a: str, wa: float):
        pipe.load_lora_weights(str(files[a]), adapter_name=a)
        pipe.load_lora_weights(str(files["lcm"]), adapter_name="lcm")
        pipe.set_adapters([a, "lcm"], [wa, 0.35])
        pipe.fuse_lora(adapter_names=[a, "lcm"], lora_scale=1.0)

    def unfuse_unload():
        pipe.unfuse_lora()
        pipe.unload_lora_weights()

    apply_samples, restore_samples, switch_samples = [], [], []
    exact = True
    worst_changed, worst_diff = 0, 0.0
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        load_fuse("style_a", 0.8)
        sync(device)
        t1 = time.perf_counter()
        unfuse_unload()
        sync(device)
        t2 = time.perf_counter()
        changed, diff = differing(unet, pristine)
        exact &= changed == 0
        worst_changed, worst_diff = max(worst_changed, changed), max(worst_diff, diff)
        load_fuse("style_a", 0.8)
        sync(device)
        t3 = time.perf_counter()
        unfuse_unload()
        load_fuse("style_b", 0.6)
        sync(device)
        t4 = time.perf_counter()
        unfuse_unload()
        apply_samples.append(t1 - t0)
        restore_samples.append(t2 - t1)
        switch_samples.append(t4 - t3)
    for key, value in pristine.items():  # leave the UNet as it was for what follows
        unet.state_dict()[key].copy_(value)
    return {
        "apply_s": statistics.median(apply_samples),
        "restore_s": statistics.median(restore_samples),
        "switch_s": statistics.median(switch_samples),
        "bit_exact": exact,
        "changed_tensors_after_one_cycle": worst_changed,
        "max_abs_diff_after_one_cycle": worst_diff,
    }


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl"), default="sd15")
    parser.add_argument(
        "--shape", choices=("real", "tiny"), default="real", help="the family's real UNet, or a tiny one"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    print(f"building a {args.shape} {args.family} UNet ({dtype}, {device}) and LoRA files ...", flush=True)
    unet = build_unet(args.family, args.shape, device, dtype)
    with tempfile.TemporaryDirectory() as scratch:
        files = {
            "style_a": Path(scratch) / "style_a.safetensors",
            "style_b": Path(scratch) / "style_b.safetensors",
            "lcm": Path(scratch) / "lcm.safetensors",
        }
        layers = {
            "style_a": write_lora(unet, files["style_a"], STYLE_LAYERS, 32, 1),
            "style_b": write_lora(unet, files["style_b"], STYLE_LAYERS, 32, 2),
            "lcm": write_lora(unet, files["lcm"], LCM_LAYERS, 64, 3),
        }
        pristine = snapshot(unet)
        print("lorafleet apply / restore / switch ...", flush=True)
        patcher, loras, ours = bench_lorafleet(unet, files, device, args.repeats)
        assert differing(unet, pristine)[0] == 0
        theirs = None
        if not args.skip_diffusers:
            print("diffusers load+set_adapters+fuse / unfuse+unload ...", flush=True)
            theirs = bench_diffusers(unet, files, device, dtype, max(1, min(args.repeats, 3)), pristine)
            patcher = WeightPatcher({"unet": unet})  # diffusers replaced modules while adapters were loaded
            loras = {
                n: parse_lora(load_file(str(p)), patcher.index, "kohya-lora", device=device)
                for n, p in files.items()
            }
        print(f"{args.changes} random stack changes ...", flush=True)
        changes = random_changes(unet, patcher, loras, pristine, device, args.changes)

    limit = ours["copy_limit_s"]
    rows = [
        ("memory-copy limit (touched bytes)", limit, None, None),
        (
            f"LoRA products alone ({ours['gemm_flops'] / 1e9:.0f} GFLOP)",
            ours["gemm_limit_s"],
            ours["gemm_limit_s"] / limit,
            None,
        ),
        ("lorafleet apply S1", ours["apply_s"], ours["apply_s"] / limit, None),
        ("lorafleet restore S1", ours["restore_s"], ours["restore_s"] / limit, True),
        ("lorafleet switch S1 -> S2", ours["switch_s"], ours["switch_s"] / limit, None),
    ]
    if theirs:
        rows += [
            ("diffusers load+set_adapters+fuse S1", theirs["apply_s"], theirs["apply_s"] / limit, None),
            (
                "diffusers unfuse+unload S1",
                theirs["restore_s"],
                theirs["restore_s"] / limit,
                theirs["bit_exact"],
            ),
            ("diffusers switch S1 -> S2", theirs["switch_s"], theirs["switch_s"] / limit, None),
        ]
    print()
    print(
        f"{args.shape} {args.family} UNet, {dtype}, {device}: {ours['touched_params']} touched parameters, "
        f"{ours['touched_bytes'] / 1e9:.2f} GB; LoRA layers {layers}"
    )
    print(f"{'':40} {'ms':>10} {'x copy':>8} {'exact':>6}")
    for name, seconds, ratio, exact in rows:
        exact_text = "" if exact is None else ("yes" if exact else "NO")
        ratio_text = "" if ratio is None else f"{ratio:.2f}"
        print(f"{name:40} {seconds * 1000:10.1f} {ratio_text:>8} {exact_text:>6}")
    if theirs:
        print(
            f"switch speed-up over diffusers: {theirs['switch_s'] / ours['switch_s']:.1f}x; diffusers changed "
            f"{theirs['changed_tensors_after_one_cycle']} tensors (max |diff| {theirs['max_abs_diff_after_one_cycle']:.3g}) "
            "after one fuse/unfuse cycle"
        )
    grow = changes["memory_after_last_bytes"] - (changes["memory_after_10_bytes"] or 0)
    print(
        f"{changes['changes']} random changes in {changes['seconds']:.1f} s: bit-exact at end "
        f"{changes['bit_exact_at_end']}, repeated stacks identical {changes['repeat_checks'] - changes['repeat_mismatches']}"
        f"/{changes['repeat_checks']}, memory growth after change 10: {grow / 1e6:+.1f} MB"
    )
    record = {
        "bench": "lora_switch",
        "commit": commit(),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        },
        "family": args.family,
        "shape": args.shape,
        "dtype": str(dtype).replace("torch.", ""),
        "lorafleet": ours,
        "diffusers": theirs,
        "random_changes": changes,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
