"""Which flow-matching family a LoRA was made for, from its tensor names and shapes alone.

FLUX.1, FLUX.2, Qwen-Image and Z-Image LoRAs come under many namings: diffusers/PEFT
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``), the models' original names
as ComfyUI and ai-toolkit write them (``diffusion_model.double_blocks.0.img_attn.qkv``),
kohya and musubi (``lora_unet_double_blocks_0_img_attn_qkv``), OneTrainer
(``lora_transformer_…``), LyCORIS (``lycoris_…``), XLabs (``…processor.qkv_lora1``).
``LAYERS`` lists each family's modules once, under every naming, with ``.`` or ``_``
between the parts (kohya flattens the dots), and each linear layer's input and output
widths as multiples of the transformer's width ``d`` (``None``: any size).

Semantics: a file fits a family when every module it patches (text-encoder keys aside) is
one of the family's and all its factor shapes give one and the same ``d`` (a LoRA's down
factor is ``(rank, in)``, its up factor ``(out, rank)``; LoHa and LoKr factors multiply
out to the same two sizes). Names alone cannot tell some files apart: FLUX.1's double
blocks, FLUX.2's and Qwen-Image's blocks are all ``transformer_blocks.N.attn.to_q`` in
diffusers, and FLUX.1 and FLUX.2 share ``double_blocks.N.img_attn.qkv``. Then the width
and the highest block index decide, against the released models' geometry
(``GEOMETRIES``); when they do not, the family stays unknown: nothing is guessed. Some
names are also those of architectures lorafleet has no family for (``FOREIGN``: SD3's
MMDiT blocks are FLUX.1's diffusers double blocks, Lumina 2's layers Z-Image's original
ones): a file that fits one of them too must have the family's released width.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from lorafleet.common.schema.family import Family

FOREIGN = ("sd3", "lumina2")
"""Architectures without a lorafleet family whose LoRA names overlap a family's."""


@dataclass(frozen=True)
class Geometry:
    """One released model: its transformer width and how many blocks of each kind it has."""

    family: Family | str
    """A family, or one of FOREIGN."""
    variant: str | None
    width: int
    blocks: Mapping[str, int]


GEOMETRIES = (
    # FluxTransformer2DModel defaults (24 heads x 128; 19 double, 38 single blocks): dev, schnell, Krea.
    Geometry(Family.flux1, None, 3072, {"double": 19, "single": 38}),
    # QwenImageTransformer2DModel defaults: 24 heads x 128, 60 blocks.
    Geometry(Family.qwenimage, None, 3072, {"double": 60}),
    # ZImageTransformer2DModel defaults (Z-Image Turbo): dim 3840, 30 layers, 2 refiner layers each.
    Geometry(Family.zimage, None, 3840, {"layers": 30, "noise_refiner": 2, "context_refiner": 2}),
    # BFL's flux2 Klein4BParams / Klein9BParams / Flux2Params (hidden_size, depth, depth_single_blocks).
    Geometry(Family.flux2, "klein-4b", 3072, {"double": 5, "single": 20}),
    Geometry(Family.flux2, "klein-9b", 4096, {"double": 8, "single": 24}),
    Geometry(Family.flux2, "dev", 6144, {"double": 8, "single": 48}),
    # SD3Transformer2DModel: SD3 / 3.5 Medium (24 x 64, 24 blocks), SD 3.5 Large (38 x 64, 38 blocks).
    Geometry("sd3", None, 1536, {"double": 24}),
    Geometry("sd3", None, 2432, {"double": 38}),
    # Lumina2Transformer2DModel defaults (Lumina-Image 2.0): 2304 wide, 26 layers.
    Geometry("lumina2", None, 2304, {"layers": 26, "noise_refiner": 2, "context_refiner": 2}),
)
"""The released models LoRAs are trained on (the FOREIGN ones too). LoRAs do not cross
variants: a FLUX.2 Klein 4B LoRA does not fit Klein 9B."""


def variant_of(family: Family, width: int | None) -> str | None:
    """The variant of ``family`` that is ``width`` wide, if its width names one."""
    found = {g.variant for g in GEOMETRIES if g.family == family and g.width == width}
    return found.pop() if len(found) == 1 else None


def _zimage_ffn(d: int) -> int:
    return int(d / 3 * 8)  # ZImageTransformerBlock's feed_forward hidden width


def _zimage_adaln(d: int) -> int:
    return min(d, 256)  # ADALN_EMBED_DIM


@dataclass(frozen=True)
class _Layer:
    pattern: re.Pattern[str]
    d_in: int | Callable[[int], int] | None
    """Input width: that many times ``d``, a function of ``d``, or None (any)."""
    d_out: int | Callable[[int], int] | None


def _layers(*specs: tuple) -> tuple[_Layer, ...]:
    """Layers from (pattern, d_in, d_out); a ``\\.`` in a pattern matches ``.`` or ``_``."""
    return tuple(_Layer(re.compile(p.replace(r"\.", "[._]")), d_in, d_out) for p, d_in, d_out in specs)


_DOUBLE = r"(?P<block>transformer_blocks)\.(?P<n>\d+)\."
_SINGLE = r"(?P<block>single_transformer_blocks)\.(?P<n>\d+)\."
_BFL_DOUBLE = r"(?P<block>double_blocks)\.(?P<n>\d+)\."
_BFL_SINGLE = r"(?P<block>single_blocks)\.(?P<n>\d+)\."
_Z_BLOCK = r"(?P<block>layers|noise_refiner|context_refiner)\.(?P<n>\d+)\."
_ATTN = r"attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
_FUSED_ATTN = r"attn\.(?:to_qkv|to_added_qkv)"
_ATTN_NORMS = r"attn\.(?:norm_q|norm_k|norm_added_q|norm_added_k)"
_BFL_NORMS = r"norm\.(?:query_norm|key_norm)"
_BFL_IN = (
    (r"img_in", None, 1),
    (r"txt_in", None, 1),
    (r"(?:time_in|vector_in|guidance_in)\.(?:in_layer|out_layer)", None, 1),
    (r"final_layer\.linear", 1, None),
    (r"final_layer\.adaLN_modulation\.1", 1, 2),
)
_DIFFUSERS_IN = (
    (r"x_embedder", None, 1),
    (r"context_embedder", None, 1),
    (r"proj_out", 1, None),
    (r"norm_out\.linear", 1, 2),
)

LAYERS: dict[Family | str, tuple[_Layer, ...]] = {
    # diffusers transformer_flux.py; BFL flux/model.py; XLabs' processor LoRAs.
    Family.flux1: _layers(
        (_DOUBLE + _ATTN, 1, 1),
        (_DOUBLE + _FUSED_ATTN, 1, 3),
        (_DOUBLE + r"(?:ff|ff_context)\.net\.0\.proj", 1, 4),
        (_DOUBLE + r"(?:ff|ff_context)\.net\.2", 4, 1),
        (_DOUBLE + r"(?:norm1|norm1_context)\.linear", 1, 6),
        (_DOUBLE + _ATTN_NORMS, None, None),
        (_SINGLE + r"attn\.(?:to_q|to_k|to_v)", 1, 1),
        (_SINGLE + r"attn\.to_qkv", 1, 3),
        (_SINGLE + r"proj_mlp", 1, 4),
        (_SINGLE + r"proj_out", 5, 1),
        (_SINGLE + r"norm\.linear", 1, 3),
        (_SINGLE + r"attn\.(?:norm_q|norm_k)", None, None),
        (_BFL_DOUBLE + r"(?:img|txt)_attn\.qkv", 1, 3),
        (_BFL_DOUBLE + r"(?:img|txt)_attn\.proj", 1, 1),
        (_BFL_DOUBLE + r"(?:img|txt)_mlp\.0", 1, 4),
        (_BFL_DOUBLE + r"(?:img|txt)_mlp\.2", 4, 1),
        (_BFL_DOUBLE + r"(?:img|txt)_mod\.lin", 1, 6),
        (_BFL_DOUBLE + r"(?:img|txt)_attn\." + _BFL_NORMS, None, None),
        (_BFL_SINGLE + r"linear1", 1, 7),
        (_BFL_SINGLE + r"linear2", 5, 1),
        (_BFL_SINGLE + r"modulation\.lin", 1, 3),
        (_BFL_SINGLE + _BFL_NORMS, None, None),
        (_BFL_DOUBLE + r"processor\.qkv_lora[12]", 1, 3),
        (_BFL_DOUBLE + r"processor\.proj_lora[12]", 1, 1),
        (_BFL_SINGLE + r"processor\.qkv_lora", 1, 3),
        (_BFL_SINGLE + r"processor\.proj_lora", None, 1),
        *_DIFFUSERS_IN,
        (r"time_text_embed\.(?:timestep_embedder|guidance_embedder|text_embedder)\.linear_[12]", None, 1),
        *_BFL_IN,
    ),
    # diffusers transformer_flux2.py (shared modulation, SwiGLU feed-forward, fused single blocks).
    Family.flux2: _layers(
        (_DOUBLE + _ATTN, 1, 1),
        (_DOUBLE + _FUSED_ATTN, 1, 3),
        (_DOUBLE + r"(?:ff|ff_context)\.linear_in", 1, 6),
        (_DOUBLE + r"(?:ff|ff_context)\.linear_out", 3, 1),
        (_DOUBLE + _ATTN_NORMS, None, None),
        (_SINGLE + r"attn\.to_qkv_mlp_proj", 1, 9),
        (_SINGLE + r"attn\.to_out", 4, 1),
        (_SINGLE + r"attn\.(?:norm_q|norm_k)", None, None),
        (_BFL_DOUBLE + r"(?:img|txt)_attn\.qkv", 1, 3),
        (_BFL_DOUBLE + r"(?:img|txt)_attn\.proj", 1, 1),
        (_BFL_DOUBLE + r"(?:img|txt)_mlp\.0", 1, 6),
        (_BFL_DOUBLE + r"(?:img|txt)_mlp\.2", 3, 1),
        (_BFL_DOUBLE + r"(?:img|txt)_attn\." + _BFL_NORMS, None, None),
        (_BFL_SINGLE + r"linear1", 1, 9),
        (_BFL_SINGLE + r"linear2", 4, 1),
        (_BFL_SINGLE + _BFL_NORMS, None, None),
        *_DIFFUSERS_IN,
        (r"time_guidance_embed\.(?:timestep_embedder|guidance_embedder)\.linear_[12]", None, 1),
        (r"double_stream_modulation_(?:img|txt)\.(?:linear|lin)", 1, 6),
        (r"single_stream_modulation\.(?:linear|lin)", 1, 3),
        *_BFL_IN,
    ),
    # diffusers transformer_qwenimage.py (the original code uses the same names).
    Family.qwenimage: _layers(
        (_DOUBLE + _ATTN, 1, 1),
        (_DOUBLE + _FUSED_ATTN, 1, 3),
        (_DOUBLE + r"(?:img_mlp|txt_mlp)\.net\.0\.proj", 1, 4),
        (_DOUBLE + r"(?:img_mlp|txt_mlp)\.net\.2", 4, 1),
        (_DOUBLE + r"(?:img_mod|txt_mod)\.1", 1, 6),
        (_DOUBLE + _ATTN_NORMS, None, None),
        *_DIFFUSERS_IN,
        (r"img_in", None, 1),
        (r"txt_in", None, 1),
        (r"time_text_embed\.timestep_embedder\.linear_[12]", None, 1),
    ),
    # diffusers transformer_z_image.py and the original names (fused attention.qkv, attention.out).
    Family.zimage: _layers(
        (_Z_BLOCK + r"attention\.(?:to_q|to_k|to_v|to_out\.0|out)", 1, 1),
        (_Z_BLOCK + r"attention\.qkv", 1, 3),
        (_Z_BLOCK + r"feed_forward\.(?:w1|w3)", 1, _zimage_ffn),
        (_Z_BLOCK + r"feed_forward\.w2", _zimage_ffn, 1),
        (_Z_BLOCK + r"adaLN_modulation\.0", _zimage_adaln, 4),
        (_Z_BLOCK + r"attention\.(?:norm_q|norm_k|q_norm|k_norm)", None, None),
        (_Z_BLOCK + r"(?:attention_norm1|attention_norm2|ffn_norm1|ffn_norm2)", None, None),
        (r"(?:all_x_embedder\.[\w-]+|x_embedder)", None, 1),
        (r"cap_embedder\.1", None, 1),
        (r"(?:all_final_layer\.[\w-]+|final_layer)\.linear", 1, None),
        (r"(?:all_final_layer\.[\w-]+|final_layer)\.adaLN_modulation\.1", _zimage_adaln, 1),
        (r"t_embedder\.mlp\.[02]", None, None),
    ),
    # diffusers transformer_sd3.py (MMDiT joint blocks; SD 3.5 Medium's second attention).
    "sd3": _layers(
        (_DOUBLE + r"(?:attn|attn2)\.(?:to_q|to_k|to_v|to_out\.0)", 1, 1),
        (_DOUBLE + _ATTN, 1, 1),
        (_DOUBLE + r"(?:ff|ff_context)\.net\.0\.proj", 1, 4),
        (_DOUBLE + r"(?:ff|ff_context)\.net\.2", 4, 1),
        (_DOUBLE + r"(?:norm1|norm1_context)\.linear", 1, None),
        (_DOUBLE + _ATTN_NORMS, None, None),
        *_DIFFUSERS_IN,
        (r"pos_embed\.proj", None, 1),
        (r"time_text_embed\.(?:timestep_embedder|text_embedder)\.linear_[12]", None, 1),
    ),
    # Lumina 2's original names (Z-Image's, with grouped key/value heads and adaLN_modulation.1).
    "lumina2": _layers(
        (_Z_BLOCK + r"attention\.(?:qkv|out)", 1, None),
        (_Z_BLOCK + r"feed_forward\.(?:w1|w2|w3)", None, None),
        (_Z_BLOCK + r"adaLN_modulation\.1", None, 4),
        (_Z_BLOCK + r"attention\.(?:q_norm|k_norm)", None, None),
        (_Z_BLOCK + r"(?:attention_norm1|attention_norm2|ffn_norm1|ffn_norm2)", None, None),
        (r"(?:x_embedder|cap_embedder\.1)", None, 1),
        (r"final_layer\.(?:linear|adaLN_modulation\.1)", None, None),
        (r"t_embedder\.mlp\.[02]", None, None),
    ),
}
"""Every module a family's (or a FOREIGN architecture's) LoRAs patch, under each naming,
with its widths in ``d``."""

_BLOCK_KIND = {
    "transformer_blocks": "double",
    "double_blocks": "double",
    "single_transformer_blocks": "single",
    "single_blocks": "single",
    "layers": "layers",
    "noise_refiner": "noise_refiner",
    "context_refiner": "context_refiner",
}
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te1.", "te2.", "te.")
_PREFIXES = (
    "base_model.model.",
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
    "lora_unet_",
    "lora_transformer_",
    "lycoris_",
)
"""What trainers put before the model's own module names (PEFT, ComfyUI, kohya, OneTrainer, LyCORIS)."""
_FACTOR = re.compile(
    r"^(?P<module>.+?)\.(?P<factor>lora_[AB](?:\.[^.]+)?\.(?:weight|bias)|lora_(?:down|up|mid)\.weight"
    r"|lora\.(?:down|up)\.weight|(?:down|up)\.weight|hada_w[12]_[ab]|hada_t[12]|lokr_w[12](?:_[ab])?"
    r"|lokr_t2|diff|diff_b|alpha|dora_scale|lora_magnitude_vector(?:\.[^.]+)?(?:\.weight)?)$"
)


@dataclass(frozen=True)
class Fit:
    """How a file fits one family: the width its shapes give and its highest block indices."""

    width: int | None
    last_block: Mapping[str, int]
    """Highest index patched per kind of block (``double``, ``single``, ``layers`` ...)."""

    def fits(self, geometry: Geometry) -> bool:
        return self.width == geometry.width and all(
            n < geometry.blocks.get(kind, 0) for kind, n in self.last_block.items()
        )


@dataclass(frozen=True)
class LoraBase:
    """What a LoRA's names, shapes and metadata say about its flow-matching base model."""

    family: Family | None
    """The one family that fits; None when names and shapes leave it open (or fit none)."""
    variant: str | None = None
    """``klein-4b``, ``klein-9b`` or ``dev`` for FLUX.2 (from the width), ``edit`` for
    Qwen-Image Edit (from the metadata); None when nothing tells."""
    width: int | None = None
    """The transformer width (hidden size) the factor shapes give."""


def lora_modules(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, tuple[int | None, int | None]]:
    """The modules a LoRA patches, under the model's own names (trainer prefixes removed,
    text encoders left out), each with the (input, output) widths its factors show."""
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        if key.startswith(_TEXT_ENCODER_PREFIXES):
            continue
        found = _FACTOR.match(key)
        if found is None:
            continue
        module = found["module"]
        for _ in range(3):
            stripped = next((module[len(p) :] for p in _PREFIXES if module.startswith(p)), module)
            if stripped == module:
                break
            module = stripped
        factors.setdefault(module, {})[found["factor"]] = shape
    return {module: _in_out(parts) for module, parts in factors.items()}


def _in_out(parts: dict[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    d_in = d_out = None
    for name, shape in parts.items():
        if name.startswith(("lora_A", "lora_down", "lora.down", "down.")) and len(shape) >= 2:
            d_in = shape[1]
        elif name.startswith(("lora_B", "lora_up", "lora.up", "up.")) and shape:
            d_out = shape[0]
        elif name == "hada_w1_a" and len(shape) == 2:
            d_out = shape[0]
        elif name == "hada_w1_b" and len(shape) == 2:
            d_in = shape[1]
        elif name == "diff" and len(shape) >= 2:
            d_out, d_in = shape[0], shape[1]
        elif name == "diff_b" and len(shape) == 1:
            d_out = shape[0]
    w1, w2 = _kron_factor(parts, "lokr_w1"), _kron_factor(parts, "lokr_w2")
    if w1 is not None and w2 is not None:  # LoKr: delta = kron(w1, w2)
        d_out, d_in = w1[0] * w2[0], w1[1] * w2[1]
    return d_in, d_out


def _kron_factor(parts: dict[str, tuple[int, ...]], name: str) -> tuple[int, int] | None:
    whole, a, b = parts.get(name), parts.get(name + "_a"), parts.get(name + "_b")
    if whole is not None and len(whole) == 2:
        return whole[0], whole[1]
    if a is not None and b is not None and len(a) == 2 and len(b) == 2:
        return a[0], b[1]
    return None


def fit(family: Family | str, modules: Mapping[str, tuple[int | None, int | None]]) -> Fit | None:
    """How ``modules`` fit ``family``: None if one is not the family's or the shapes disagree."""
    widths: set[int] = set()
    checks: list[tuple[Callable[[int], int], int]] = []
    last: dict[str, int] = {}
    for module, sizes in modules.items():
        layer, found = _layer(family, module)
        if layer is None or found is None:
            return None
        if found.groupdict().get("block"):
            kind = _BLOCK_KIND[found["block"]]
            last[kind] = max(last.get(kind, -1), int(found["n"]))
        for spec, size in zip((layer.d_in, layer.d_out), sizes):
            if spec is None or size is None:
                continue
            if isinstance(spec, int):
                if size % spec:
                    return None
                widths.add(size // spec)
            else:
                checks.append((spec, size))
    if len(widths) > 1 or not last:
        return None
    width = next(iter(widths), None)
    if width is not None and any(spec(width) != size for spec, size in checks):
        return None
    return Fit(width, last)


def _layer(family: Family | str, module: str) -> tuple[_Layer | None, re.Match[str] | None]:
    for layer in LAYERS[family]:
        found = layer.pattern.fullmatch(module)
        if found is not None:
            return layer, found
    return None, None


def is_transformer_lora(modules: Mapping[str, tuple[int | None, int | None]]) -> bool:
    """Some module is a block of a flow family or a FOREIGN transformer (under any naming)."""
    return any(
        (found := _layer(family, module)[1]) is not None and found.groupdict().get("block")
        for module in modules
        for family in LAYERS
    )


def family_from_keys(
    shapes: Mapping[str, tuple[int, ...]],
) -> tuple[dict[Family | str, Fit], LoraBase] | None:
    """The architectures a LoRA's names and shapes fit, and the family they tell (if any);
    None when no key is a block of a flow family or a FOREIGN transformer."""
    modules = lora_modules(shapes)
    if not is_transformer_lora(modules):
        return None
    fits = {arch: f for arch in LAYERS if (f := fit(arch, modules)) is not None}
    if len(fits) > 1:  # names shared: keep what the released geometry fits
        fits = {arch: f for arch, f in fits.items() if any(f.fits(g) for g in _geometries(arch))}
    if len(fits) != 1:
        widths = {f.width for f in fits.values()}
        return fits, LoraBase(None, width=widths.pop() if len(widths) == 1 else None)
    arch, found = next(iter(fits.items()))
    if not isinstance(arch, Family):
        return fits, LoraBase(None, width=found.width)
    return fits, LoraBase(arch, variant_of(arch, found.width), found.width)


def _geometries(arch: Family | str) -> list[Geometry]:
    return [g for g in GEOMETRIES if g.family == arch]


@dataclass(frozen=True)
class _Claim:
    family: Family | None
    """None: an architecture lorafleet has no family for."""
    variant: str | None = None


_ARCHITECTURES = (
    ("flux2klein4b", _Claim(Family.flux2, "klein-4b")),
    ("flux2klein9b", _Claim(Family.flux2, "klein-9b")),
    ("flux2dev", _Claim(Family.flux2, "dev")),
    ("flux2", _Claim(Family.flux2)),
    ("flux1", _Claim(Family.flux1)),
    ("zimage", _Claim(Family.zimage)),
    ("qwenimageedit", _Claim(Family.qwenimage, "edit")),
    ("qwenimage", _Claim(Family.qwenimage)),
    ("chroma", _Claim(None)),
    ("lumina", _Claim(None)),
    ("sd3", _Claim(None)),
    ("stablediffusion3", _Claim(None)),
)
"""Metadata spellings, letters and digits only: kohya's ``ss_base_model_version`` ("flux1"),
ModelSpec architectures by sd-scripts and musubi-tuner ("flux-1-dev/lora", "Flux.1-dev/lora",
"Flux.2-klein-4b/lora", "Qwen-Image-Edit/lora", "Z-Image/lora"), first match wins."""


def _claim(metadata: Mapping[str, str]) -> _Claim | None:
    for key in ("modelspec.architecture", "ss_base_model_version"):
        spelled = re.sub(r"[^a-z0-9]", "", (metadata.get(key) or "").lower())
        for prefix, claim in _ARCHITECTURES:
            if spelled.startswith(prefix):
                return claim
    return None


def flow_base(metadata: Mapping[str, str], shapes: Mapping[str, tuple[int, ...]]) -> LoraBase | None:
    """The flow-matching base a LoRA was made for, from its metadata, names and shapes;
    None when neither its metadata nor its keys name a flow family (an SD file, say).

    The metadata decides between the families the names and shapes leave open, never
    against them: a file whose metadata names a family its tensors do not fit is unknown.
    """
    claim = _claim(metadata)
    keys = family_from_keys(shapes)
    if claim is None:
        return None if keys is None else keys[1]
    if claim.family is None:
        return LoraBase(None, width=keys[1].width if keys else None)
    if keys is None:
        return LoraBase(claim.family, claim.variant)
    fits, told = keys
    if told.family is not None and told.family is not claim.family:
        return LoraBase(None, width=told.width)
    found = fits.get(claim.family)
    if found is None:
        # The geometry filter may have dropped it: the names and shapes still fit the claim?
        found = fit(claim.family, lora_modules(shapes))
        if found is None:
            return LoraBase(None, width=told.width)
    return LoraBase(claim.family, variant_of(claim.family, found.width) or claim.variant, found.width)
