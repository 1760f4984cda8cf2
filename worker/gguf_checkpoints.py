"""GGUF transformers of the flow families (city96's and others' Q8_0, Q4_K ... files of
FLUX.1, Z-Image, Qwen-Image and FLUX.2 Klein): loaded quantized, LoRAs only beside them.

Semantics:
- Reading: diffusers' GGUF reader (the ``gguf`` package) gives every quantized tensor as a
  ``GGUFParameter`` (its blocks' bytes, rows × bytes per row) and F32/F16 tensors as they
  are. Names go through the same shape-derived map as a safetensors file
  (``flow_checkpoints.transformer_from_original``): quantization blocks run along a row, so
  a fused original layer's rows are dealt out to diffusers' modules byte for byte.
- Each Linear whose weight is quantized becomes diffusers' ``GGUFLinear``: its weight is
  dequantized to the compute dtype on every forward (y = x · deq(Wq)ᵀ + b) and never stored
  wider. Every other tensor becomes the pipeline's dtype.
- The quantized bytes are never written. Requantizing W + ΔW would be lossy and could not be
  undone, so a GGUF model takes LoRAs only as side paths (y = x · deq(Wq)ᵀ + b + U(Dx)), the
  resolver gives its jobs ``lora_mode`` side, and the patcher refuses to merge into a
  quantized weight (``is_quantized``).
- ``write_gguf`` writes a transformer as a GGUF file in the original code's names, quantizing
  the weight matrices whose rows fill whole blocks (as the converters people use do; the
  rest stay F32): the tests' tiny checkpoints.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lorafleet.common.schema.errors import JobFailed
from lorafleet.worker.flow_checkpoints import (
    TRANSFORMER_CLASS,
    transformer_from_original,
    transformer_to_original,
)

logger = logging.getLogger(__name__)


def is_quantized(param: torch.Tensor) -> bool:
    """Whether ``param`` holds GGUF blocks (bytes) rather than values."""
    return getattr(param, "quant_type", None) is not None


def logical_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The shape of the values ``param`` stands for (a GGUF parameter's is its bytes')."""
    return tuple(getattr(param, "quant_shape", param.shape))


def _values(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's values (a GGUF tensor dequantized, float32; any other as it is)."""
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(tensor).to(torch.float32) if is_quantized(tensor) else tensor


def read_gguf(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors: quantized ones as ``GGUFParameter``; JobFailed names a bad file."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    try:
        return load_gguf_checkpoint(str(path))
    except (ValueError, KeyError, IndexError, OSError) as exc:
        raise JobFailed(
            f"{path.name}: not a GGUF file lorafleet can read ({type(exc).__name__}: {exc})"
        ) from exc


def load_gguf_transformer(path: Path, base: str, class_name: str, dtype: torch.dtype, local: bool):
    """The transformer of a ``class_name`` pipeline from the GGUF file at ``path``, its config
    from ``base``: quantized Linears as ``GGUFLinear`` computing in ``dtype``."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers.quantizers.gguf.utils import GGUFLinear, _replace_with_gguf_linear

    transformer_class = getattr(diffusers, TRANSFORMER_CLASS[class_name])
    config = transformer_class.load_config(base, subfolder="transformer", local_files_only=local)
    with init_empty_weights():
        transformer = transformer_class.from_config(config)
    # only 2-D weights stay blocks; the rest (stable-diffusion.cpp's 1-D pad tokens, BF16
    # biases and norms, which diffusers' reader also hands over as blocks) become values
    state = {
        key: tensor if key.endswith(".weight") and len(logical_shape(tensor)) == 2 else _values(tensor)
        for key, tensor in read_gguf(path).items()
    }
    converted = transformer_from_original(state, transformer, path.name)
    # diffusers' own replacement (a private helper: its quantizer is only reachable through
    # from_single_file, whose FLUX.1 conversion assumes the full 3072 width)
    _replace_with_gguf_linear(transformer, dtype, converted)
    quantized = 0
    for key, tensor in converted.items():
        module_name, _, name = key.rpartition(".")
        module = transformer.get_submodule(module_name)
        if is_quantized(tensor) and not (isinstance(module, GGUFLinear) and name == "weight"):
            tensor = _values(tensor)  # a quantized weight of a layer that is no Linear
        if is_quantized(tensor):
            tensor.requires_grad_(False)
            module._parameters[name] = tensor
            quantized += 1
        elif name in module._parameters:
            module._parameters[name] = torch.nn.Parameter(tensor.to(dtype), requires_grad=False)
        else:
            module._buffers[name] = tensor.to(dtype)
    if quantized == 0:
        raise JobFailed(
            f"{path.name}: no quantized tensor in it; a GGUF file of F32/F16 tensors only is better "
            "served as .safetensors"
        )
    logger.info("GGUF transformer %s: %d quantized weights", path.name, quantized)
    return transformer


def load_gguf_checkpoint(path: Path, base: str, class_name: str, dtype: torch.dtype, local: bool):
    """The pipeline of ``base`` with its transformer read from the GGUF file at ``path``."""
    import diffusers

    transformer = load_gguf_transformer(path, base, class_name, dtype, local)
    return getattr(diffusers, class_name).from_pretrained(
        base, transformer=transformer, dtype=dtype, local_files_only=local
    )


def write_gguf(transformer: torch.nn.Module, path: Path, quant: str = "Q8_0", arch: str = "flux") -> Path:
    """Write ``transformer`` as a GGUF file in the original code's names: each 2-D weight whose
    rows fill whole blocks of ``quant``, quantized; every other tensor F32."""
    import gguf
    import numpy as np

    kind = gguf.GGMLQuantizationType[quant]
    block, _ = gguf.GGML_QUANT_SIZES[kind]
    writer = gguf.GGUFWriter(str(path), arch)
    for name, tensor in transformer_to_original(transformer).items():
        values = tensor.detach().to(torch.float32).numpy()
        if name.endswith(".weight") and values.ndim == 2 and values.shape[1] % block == 0:
            blocks = quantize_q4_k(values) if quant == "Q4_K" else gguf.quants.quantize(values, kind)
            writer.add_tensor(name, blocks, raw_dtype=kind)
        else:
            writer.add_tensor(name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def dequantized(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every quantized weight of ``transformer`` as its values (float32): the reference a
    test merges a LoRA into."""
    return {name: _values(param) for name, param in transformer.named_parameters() if is_quantized(param)}


def quantize_q4_k(values):
    """GGML's Q4_K blocks of a float32 (rows, k·256) array, as (rows, k·144) bytes.

    The ``gguf`` package dequantizes Q4_K but cannot write it, so the tests' Q4_K files are
    quantized here, plainly (no search for the best scales as llama.cpp's quantizer does).
    A block of 256 values is 8 sub-blocks of 32: value = d·sc_j·q − dmin·m_j with q in 0..15,
    sc_j and m_j 6-bit, d and dmin float16; bytes: d, dmin, 12 bytes of packed sc/m, then 128
    bytes of nibbles (sub-blocks 2i and 2i+1 share 32 bytes, low nibble first).
    """
    import numpy as np

    rows = values.shape[0]
    x = values.astype(np.float32).reshape(-1, 8, 32)  # blocks, sub-blocks, values
    low = np.minimum(x.min(axis=2), 0.0)
    scale = (x.max(axis=2) - low) / 15.0
    offset = -low
    d = (scale.max(axis=1) / 63.0).astype(np.float16)
    dmin = (offset.max(axis=1) / 63.0).astype(np.float16)
    d32, dmin32 = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d32 > 0, np.clip(np.rint(scale / d32), 0, 63), 0).astype(np.uint8)
        m = np.where(dmin32 > 0, np.clip(np.rint(offset / dmin32), 0, 63), 0).astype(np.uint8)
        step = (d32 * sc)[:, :, None]
        q = np.where(step > 0, np.rint((x + (dmin32 * m)[:, :, None]) / step), 0)
    q = np.clip(q, 0, 15).astype(np.uint8)
    packed = np.empty((x.shape[0], 12), dtype=np.uint8)
    packed[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    packed[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    packed[:, 8:12] = (sc[:, 4:] & 0x0F) | ((m[:, 4:] & 0x0F) << 4)
    nibbles = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)
    blocks = np.concatenate(
        [d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2), packed, nibbles], axis=1
    )
    return blocks.reshape(rows, -1)
