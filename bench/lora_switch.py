"""LoRA stack switching: lorafleet's patcher against the memory-copy limit and diffusers.

An SD1.5-shaped UNet (the real config, random weights; --family sdxl for SDXL's; --shape tiny
for the tests' tiny UNet of that family, a smoke run whose figures mean nothing) and three
kohya-format LoRA files: two "style" LoRAs of rank 32 over attention, feed-forward and proj
layers, and one LCM-LoRA-shaped file of rank 64 that also covers the ResNet convolutions.
Stacks: S1 = style A @ 0.8 + LCM @ 0.35, S2 = style B @ 0.6 + LCM @ 0.35.

--family flux1: FLUX.1's transformer at its true width (3072) with --blocks D,S double and
single blocks (19,38 is the whole 12B model), two rank-32 style LoRAs over every attention
and MLP linear and a rank-64 "turbo" LoRA over every block linear, kohya files with BFL's
fused names for lorafleet, the same factors in PEFT naming for diffusers; the same stacks
with turbo in LCM's place. Each family's side is its own module (bench/_sd.py,
bench/_flux1.py); this script measures.

Measured in one run, side by side (medians of --repeats):
- the memory-copy limit: copy_ of every parameter S1 touches from a same-shaped buffer (the
  patcher's pristine copies, so no third copy of the weights is held);
- the arithmetic alone: S1's summed low-rank products for every touched parameter, into a
  buffer (on a CPU, applying is bound by this, not by memory);
- lorafleet: apply S1 (from pristine), restore S1, switch S1 -> S2;
- diffusers: load_lora_weights + set_adapters + fuse_lora for S1, unfuse_lora +
  unload_lora_weights, and whether that leaves the UNet bit-exact (FLUX.1: the transformer's
  own load_lora_adapter, set_adapters, fuse_lora, unfuse_lora and unload_lora);
- --changes random stack changes through lorafleet's patcher, checked bit-exact against a
  reference for repeated stacks and against the pristine weights at the end, with the
  resident memory (CPU) or allocated device memory after the first and the last change.

Prints a table and one JSON line. Never part of the test run.

    .venv/bin/python bench/lora_switch.py                       # SD1.5 shape, fp32, CPU
    .venv/bin/python bench/lora_switch.py --device cuda --dtype float16 --family sdxl
    .venv/bin/python bench/lora_switch.py --shape tiny --repeats 1 --changes 20   # a smoke run
    .venv/bin/python bench/lora_switch.py --family flux1 --changes 100   # FLUX.1, 2 + 4 blocks
    .venv/bin/python bench/lora_switch.py --family flux1 --blocks 19,38 --device cuda --dtype bfloat16
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _flux1
import _sd
import torch
from safetensors.torch import load_file

from lorafleet.worker.lora.formats import parse_lora
from lorafleet.worker.lora.patcher import StackEntry, WeightPatcher, concatenate_low_rank


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


def snapshot(unet, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of the model, copied (to ``device``: host memory for a 12B model on a GPU)."""
    return {k: v.detach().to(device, copy=True) for k, v in unet.state_dict().items()}


def differing(unet, reference) -> tuple[int, float]:
    count, worst = 0, 0.0
    for key, value in unet.state_dict().items():
        value = value.to(reference[key].device)
        if not torch.equal(value, reference[key]):
            count += 1
            worst = max(worst, (value.float() - reference[key].float()).abs().max().item())
    return count, worst


def parse_all(model, component: str, states, device):
    patcher = WeightPatcher({component: model})
    loras = {
        name: parse_lora(state, patcher.index, "kohya-lora", device=device) for name, state in states.items()
    }
    return patcher, loras


def bench_lorafleet(unet, component, states, third, device, repeats):
    patcher, loras = parse_all(unet, component, states, device)
    s1 = [StackEntry(loras["style_a"], 0.8, 0.8), StackEntry(loras[third], 0.35, 0.35)]
    s2 = [StackEntry(loras["style_b"], 0.6, 0.6), StackEntry(loras[third], 0.35, 0.35)]
    patcher.apply(s1)  # warm: pristine copies made, workspace allocated
    patcher.restore()
    keys = sorted({d.target.key for entry in s1 for d in entry.lora.deltas})
    params = [patcher.parameter(k) for k in keys]
    buffers = [patcher.original(patcher.index.targets[k]) for k in keys]
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


def random_changes(unet, patcher, loras, pristine, device, changes: int, watched, seed: int = 0):
    """``watched(key)``: the state-dict keys compared between repeated stacks."""
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
            state = {k: v.detach().clone() for k, v in unet.state_dict().items() if watched(k)}
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


def quiet_diffusers() -> None:
    import warnings

    import diffusers

    warnings.filterwarnings("ignore")
    diffusers.utils.logging.set_verbosity_error()


def bench_diffusers(unet, calls, device, repeats, pristine):
    load_fuse, unfuse_unload = calls
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


@dataclass
class Subject:
    """The model one run switches stacks on, its LoRAs and diffusers' way of fusing them."""

    model: torch.nn.Module
    component: str
    """``unet`` or ``transformer``: its name in the pipeline."""
    states: dict[str, dict[str, torch.Tensor]]
    """The kohya LoRA files lorafleet parses, by name: style_a, style_b and ``third``."""
    third: str
    """The LoRA in both stacks: ``lcm`` (SD) or ``turbo`` (FLUX.1)."""
    layers: dict[str, int]
    diffusers_calls: Callable[[], tuple]
    """Gives (load_fuse(name, weight), unfuse_unload()) for bench_diffusers."""
    watched: Callable[[str], bool]
    """The state-dict keys compared between repeated stacks."""


def prepare(args, device: torch.device, dtype: torch.dtype, scratch: Path) -> Subject:
    if args.family == "flux1":
        model = _flux1.build_transformer(args.shape, args.blocks, device, dtype)
        kohya, peft, layers = _flux1.make_loras(model, "turbo")
        return Subject(
            model,
            "transformer",
            kohya,
            "turbo",
            layers,
            lambda: _flux1.diffusers_calls(model, peft, "turbo"),
            lambda key: key == "x_embedder.weight" or "attn.to_q" in key,
        )
    unet = _sd.build_unet(args.family, args.shape, device, dtype)
    files = {name: scratch / f"{name}.safetensors" for name in ("style_a", "style_b", "lcm")}
    layers = {
        "style_a": _sd.write_lora(unet, files["style_a"], _sd.STYLE_LAYERS, 32, 1),
        "style_b": _sd.write_lora(unet, files["style_b"], _sd.STYLE_LAYERS, 32, 2),
        "lcm": _sd.write_lora(unet, files["lcm"], _sd.LCM_LAYERS, 64, 3),
    }
    return Subject(
        unet,
        "unet",
        {name: load_file(str(path)) for name, path in files.items()},
        "lcm",
        layers,
        lambda: _sd.diffusers_calls(unet, files, device, dtype),
        lambda key: key == "conv_in.weight" or "attn1.to_q" in key,
    )


def _blocks(text: str) -> tuple[int, int]:
    double, single = (int(n) for n in text.split(","))
    if double < 1 or single < 1:
        raise ValueError(text)
    return double, single


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=("sd15", "sdxl", "flux1"), default="sd15")
    parser.add_argument(
        "--shape", choices=("real", "tiny"), default="real", help="the family's real shapes, or a tiny model"
    )
    parser.add_argument(
        "--blocks",
        type=_blocks,
        default=_flux1.BLOCKS,
        metavar="D,S",
        help="flux1: double and single blocks at true width (19,38: the whole 12B model)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--changes", type=int, default=1000)
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    flux = args.family == "flux1"
    default_dtype = "float32" if device.type != "cuda" else "bfloat16" if flux else "float16"
    dtype = getattr(torch, args.dtype or default_dtype)
    if device.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())

    what = f"{args.shape} {args.family} " + ("transformer" if flux else "UNet")
    print(f"building a {what} ({dtype}, {device}) and LoRA files ...", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        subject = prepare(args, device, dtype, Path(scratch))
        unet = subject.model
        blocks = [unet.config.num_layers, unet.config.num_single_layers] if flux else None
        what += f" ({blocks[0]} double, {blocks[1]} single blocks)" if flux else ""
        # FLUX.1's copy is kept in host memory: the 12B model, its pristine copies and a
        # third copy would not fit one GPU.
        pristine = snapshot(unet, torch.device("cpu") if flux else None)
        print("lorafleet apply / restore / switch ...", flush=True)
        patcher, loras, ours = bench_lorafleet(
            unet, subject.component, subject.states, subject.third, device, args.repeats
        )
        assert differing(unet, pristine)[0] == 0
        theirs = None
        if not args.skip_diffusers:
            print("diffusers load+set_adapters+fuse / unfuse+unload ...", flush=True)
            quiet_diffusers()
            calls = subject.diffusers_calls()
            theirs = bench_diffusers(unet, calls, device, max(1, min(args.repeats, 3)), pristine)
            del calls
            # diffusers replaced modules while adapters were loaded
            del patcher, loras
            patcher, loras = parse_all(unet, subject.component, subject.states, device)
        print(f"{args.changes} random stack changes ...", flush=True)
        changes = random_changes(unet, patcher, loras, pristine, device, args.changes, subject.watched)
        layers = subject.layers

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
        f"{what}, {dtype}, {device}: {ours['touched_params']} touched parameters, "
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
        **({"blocks": blocks, "loras": layers} if flux else {}),
        "lorafleet": ours,
        "diffusers": theirs,
        "random_changes": changes,
    }
    print(json.dumps(record))


if __name__ == "__main__":
    main()
