"""Every parameter a LoRA can change, reachable by each name that LoRA files use for it.

Files name layers five ways: kohya flattens diffusers module paths with ``_``
(``lora_unet_down_blocks_0_attentions_0_proj_in``); diffusers and PEFT keep the dots
(``unet.down_blocks.0.attentions.0.proj_in``); kohya's SDXL trainer and other LDM-based
tools use the original Stable Diffusion block names (``lora_unet_input_blocks_4_1_...``,
``middle_block``, ``output_blocks``); and text-encoder paths come with or without CLIP's
``text_model.`` level; FLUX-style transformers are named by their original code
(``double_blocks.0.img_attn.qkv``), some of whose layers diffusers splits in several
(worker/lora/original_names.py): those are ``Fused`` layers. The index registers every one
of these names for every parameter.

The LDM names are derived from the UNet's own config (blocks, layers per block, which
blocks have attention), so SD1.5, SD2 and SDXL UNets all get the right mapping.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.worker.lora.original_names import original_names

COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2")
"""Pipeline components a LoRA may adapt (a pipeline has a UNet or a transformer)."""
DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")

FLAT_PREFIXES = {
    "unet": ("lora_unet_",),
    "transformer": ("lora_unet_", "lora_transformer_", "lycoris_"),  # kohya, OneTrainer, SimpleTuner
    "text_encoder": ("lora_te_", "lora_te1_"),
    "text_encoder_2": ("lora_te2_", "lora_te3_"),  # kohya's FLUX.1 trainer calls T5 te3
}
DOTTED_PREFIXES = {
    "unet": ("unet.", "base_model.model.", "diffusion_model."),
    "transformer": ("transformer.", "diffusion_model.", "model.diffusion_model.", "base_model.model.", ""),
    "text_encoder": ("text_encoder.", "te1.", "base_model.model."),
    "text_encoder_2": ("text_encoder_2.", "te2."),
}

# Inside a ResnetBlock2D, LDM's names for diffusers' layers.
_RESNET_LAYERS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


@dataclass(frozen=True)
class Target:
    """One parameter a LoRA can change."""

    component: str
    module: str
    param: str
    shape: tuple[int, ...]

    @property
    def key(self) -> str:
        return f"{self.component}:{self.module}.{self.param}"

    @property
    def is_text_encoder(self) -> bool:
        return self.component in TEXT_ENCODERS


@dataclass(frozen=True)
class Fused:
    """An original layer that diffusers splits: a delta is built for ``target`` (the
    original's shape) and its rows dealt out to ``pieces`` (each a target and the rows of
    the original, in order, that make it)."""

    target: Target
    pieces: tuple[tuple[Target, torch.Tensor], ...]


def file_module_names(component: str, module: str) -> list[str]:
    """The module paths LoRA files use for ``module``; the first is the usual one.

    transformers 5 dropped the ``text_model.`` level from CLIPTextModel (not from
    CLIPTextModelWithProjection), while files made before keep it: both are accepted.
    """
    if component not in TEXT_ENCODERS or module == "text_projection":
        return [module]
    if module.startswith("text_model."):
        return [module, module[len("text_model.") :]]
    return [f"text_model.{module}", module]


def ldm_block_prefixes(config: dict) -> dict[str, str]:
    """diffusers UNet block path -> the original (LDM/SGM) block path, from the config."""
    down_types = list(config.get("down_block_types") or ())
    up_types = list(config.get("up_block_types") or ())
    if not down_types:
        return {}
    layers = config.get("layers_per_block", 2)
    layers = list(layers) if isinstance(layers, (list, tuple)) else [layers] * len(down_types)
    prefixes = {
        "conv_in": "input_blocks.0.0",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
        "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2",
        "conv_norm_out": "out.0",
        "conv_out": "out.2",
        "mid_block.resnets.0": "middle_block.0",
        "mid_block.attentions.0": "middle_block.1",
        "mid_block.resnets.1": "middle_block.2",
    }
    index = 1
    for block, kind in enumerate(down_types):
        for layer in range(layers[block]):
            prefixes[f"down_blocks.{block}.resnets.{layer}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                prefixes[f"down_blocks.{block}.attentions.{layer}"] = f"input_blocks.{index}.1"
            index += 1
        if block < len(down_types) - 1:
            prefixes[f"down_blocks.{block}.downsamplers.0.conv"] = f"input_blocks.{index}.0.op"
            index += 1
    index = 0
    up_layers = list(reversed(layers))
    for block, kind in enumerate(up_types):
        attention = "CrossAttn" in kind
        for layer in range(up_layers[block] + 1):
            prefixes[f"up_blocks.{block}.resnets.{layer}"] = f"output_blocks.{index}.0"
            if attention:
                prefixes[f"up_blocks.{block}.attentions.{layer}"] = f"output_blocks.{index}.1"
            if layer == up_layers[block] and block < len(up_types) - 1:
                prefixes[f"up_blocks.{block}.upsamplers.0.conv"] = (
                    f"output_blocks.{index}.{2 if attention else 1}.conv"
                )
            index += 1
    return prefixes


def ldm_name(module: str, prefixes: dict[str, str]) -> str | None:
    """The LDM path of a diffusers UNet module path, or None if it has none."""
    parts = module.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in prefixes:
            rest = parts[cut:]
            if ".resnets." in f".{head}." and rest and rest[0] in _RESNET_LAYERS:
                rest = [_RESNET_LAYERS[rest[0]], *rest[1:]]
            return ".".join([prefixes[head], *rest])
    return None


class ModuleIndex:
    """Maps every name a LoRA file may use to the parameter it means."""

    def __init__(self, components: dict[str, torch.nn.Module]) -> None:
        self.targets: dict[str, Target] = {}
        self._by_name: dict[str, str] = {}  # module name as a file writes it -> module key
        self._fused: dict[str, str] = {}  # module name as a file writes it -> original layer
        self._fused_layers: dict[str, list] = {}  # original layer -> its pieces
        for component, model in components.items():
            ldm = ldm_block_prefixes(dict(getattr(model, "config", {}) or {})) if component == "unet" else {}
            for name, module in model.named_modules():
                weight = getattr(module, "weight", None)
                if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
                    continue
                if isinstance(module, torch.nn.Embedding):
                    continue
                # a GGUF weight's shape is its blocks' bytes; quant_shape is the values' it stands for
                shape = tuple(getattr(weight, "quant_shape", weight.shape))
                target = Target(component, name, "weight", shape)
                self.targets[target.key] = target
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.Tensor):
                    bias_target = Target(component, name, "bias", tuple(bias.shape))
                    self.targets[bias_target.key] = bias_target
                aliases = file_module_names(component, name)
                if ldm:
                    original = ldm_name(name, ldm)
                    if original:
                        aliases.append(original)
                self._register(component, aliases, f"{component}:{name}", self._by_name)
            if component == "transformer":
                self._register_original(model)

    def _register(self, component: str, aliases: list[str], value: str, into: dict[str, str]) -> None:
        for alias in aliases:
            for prefix in FLAT_PREFIXES[component]:
                into.setdefault(prefix + alias.replace(".", "_"), value)
            for prefix in DOTTED_PREFIXES[component]:
                if prefix or component == "transformer":  # bare names: original ones (XLabs)
                    into.setdefault(prefix + alias, value)

    def _register_original(self, transformer: torch.nn.Module) -> None:
        """The transformer's original layer names: renames as aliases, splits as Fused."""
        for original, pieces in original_names(transformer).items():
            if len(pieces) == 1 and pieces[0].whole:
                self._register("transformer", [original], f"transformer:{pieces[0].module}", self._by_name)
                continue
            rows = sum(b - a for piece in pieces for a, b in piece.rows) if len(pieces) > 1 else None
            first = self.targets[f"transformer:{pieces[0].module}.weight"]
            shape = (rows or first.shape[0], *first.shape[1:])
            self._fused_layers[original] = [Target("transformer", original, "weight", shape), pieces]
            self._register("transformer", [original], original, self._fused)

    def lookup(self, module_name: str, param: str = "weight") -> Target | None:
        """The parameter ``param`` of the module a file calls ``module_name``."""
        module_key = self._by_name.get(module_name)
        return self.targets.get(f"{module_key}.{param}") if module_key else None

    def lookup_fused(self, module_name: str, param: str = "weight") -> Fused | None:
        """The original layer a file calls ``module_name`` when diffusers splits it."""
        original = self._fused.get(module_name)
        if original is None:
            return None
        whole, pieces = self._fused_layers[original]
        targets = []
        for piece in pieces:
            target = self.targets.get(f"transformer:{piece.module}.{param}")
            if target is None:
                return None
            targets.append((target, piece.index()))
        shape = whole.shape if param == "weight" else (whole.shape[0],)
        return Fused(Target("transformer", original, param, shape), tuple(targets))

    def has_name(self, module_name: str) -> bool:
        return module_name in self._by_name or module_name in self._fused

    def parameter(self, components: dict[str, torch.nn.Module], target: Target) -> torch.nn.Parameter:
        module = components[target.component].get_submodule(target.module)
        return getattr(module, target.param)
