"""Offline tokenizers and tiny text encoders for the tiny pipelines. Nothing is downloaded.

Each tokenizer is built in memory from a small word list (``_WORDS``): a CLIP BPE (SD, FLUX.1),
a T5 Unigram (FLUX.1) and a Qwen byte-level BPE with a chat template (Z-Image, Qwen-Image,
FLUX.2 Klein). Each text encoder's ``vocab_size`` equals its tokenizer's length, and its
bos/eos/pad ids are the tokenizer's, so any prompt encodes to valid ids.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

_WORDS = (
    "a an the of in on at with and photo portrait painting style city night day cat dog "
    "lighthouse sea forest mountain robot castle flower red blue green gold light dark "
    "watercolor ink sketch oil neon sunset snow river bridge girl boy man woman old new"
).split()
_SPECIAL = ("<|startoftext|>", "<|endoftext|>")

_QWEN_TEMPLATE_WORDS = (
    "system user assistant Describe image by detailing color shape size texture quantity text "
    "spatial relationships objects background"
).split()
"""Qwen-Image's system prompt and the chat roles, one token each as in Qwen's own vocabulary,
so that the template's first 34 tokens (which QwenImagePipeline drops) are the system part."""

_QWEN_SPECIAL = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<think>",
    "</think>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)
"""Qwen3's chat template, cut to text messages: Z-Image and FLUX.2 Klein call
``apply_chat_template`` (Z-Image with thinking on, Klein with thinking off)."""


def write_clip_tokenizer(folder: Path) -> int:
    """A CLIP BPE tokenizer whose merges spell a small word list; returns its vocab size."""
    folder.mkdir(parents=True, exist_ok=True)
    symbols = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,!?-'")
    vocab: dict[str, int] = {}
    for s in symbols:
        vocab.setdefault(s, len(vocab))
        vocab.setdefault(s + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for word in _WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            merged = pair[0] + pair[1]
            if pair not in merges:
                merges.append(pair)
            vocab.setdefault(merged, len(vocab))
            pieces = [merged, *pieces[2:]]
    for token in _SPECIAL:
        vocab[token] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "CLIPTokenizer",
                "model_max_length": 77,
                "bos_token": _SPECIAL[0],
                "eos_token": _SPECIAL[1],
                "pad_token": _SPECIAL[1],
                "unk_token": _SPECIAL[1],
            }
        )
    )
    return len(vocab)


def clip_text_encoder(
    vocab_size: int,
    tokenizer_dir: Path,
    *,
    projection: bool = False,
    width: int = 32,
    activation: str = "quick_gelu",
):
    """A tiny CLIP text encoder: OpenAI's CLIP uses quick_gelu, OpenCLIP (SD 2.x, SDXL's
    second encoder) plain gelu; the widths differ as in the real models, so a single-file
    loader can tell the encoders apart."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=width,
        intermediate_size=2 * width,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        hidden_act=activation,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model, tokenizer


def t5_text_encoder(*, width: int = 32):
    """(T5EncoderModel, T5Tokenizer): a Unigram vocabulary of the word list (whole words score
    better than their letters) and a 2-layer T5 encoder ``width`` wide."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    # T5's Unigram reads pad, eos, unk at ids 0, 1, 2 (unk_id=2 is fixed in T5Tokenizer)
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(f"\u2581{word}", -1.0) for word in dict.fromkeys(_WORDS + _QWEN_TEMPLATE_WORDS)]
    pieces += [(symbol, -8.0) for symbol in string.ascii_letters + string.digits + ".,!?-':"]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=width,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config), tokenizer


def qwen_tokenizer():
    """A Qwen2 byte-level BPE: all 256 byte symbols, merges that spell each word (with and
    without its leading space) as one token, Qwen's special tokens and Qwen3's chat template.
    eos is ``<|im_end|>`` and pad ``<|endoftext|>``, as in Qwen3's instruct tokenizer."""
    from tokenizers import AddedToken, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import Qwen2Tokenizer

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    vocab = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges: list[tuple[str, str]] = []
    for word in dict.fromkeys(_QWEN_TEMPLATE_WORDS + _WORDS):
        for spelled in (word, " " + word):
            # merges added after all earlier ones never change how an earlier word splits,
            # so each word joins what the current merges leave of it, left to right
            mapped = byte_level.pre_tokenize_str(spelled)[0][0]
            pieces = [t.value for t in BPE(vocab=dict(vocab), merges=list(merges)).tokenize(mapped)]
            while len(pieces) > 1:
                merges.append((pieces[0], pieces[1]))
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
                vocab.setdefault(pieces[0], len(vocab))
    for token in _QWEN_SPECIAL:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        model_max_length=32768,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in _QWEN_SPECIAL])
    if len(tokenizer) != len(vocab):
        raise AssertionError(f"the Qwen tokenizer grew past its vocabulary: {len(tokenizer)} != {len(vocab)}")
    return tokenizer


def qwen_token_ids(tokenizer) -> dict[str, int]:
    """bos/eos/pad ids for a Qwen config, from ``qwen_tokenizer()``'s tokens (Qwen has no bos
    token: its configs name ``<|endoftext|>``)."""
    endoftext = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    return {"bos_token_id": endoftext, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": endoftext}
