"""Original-format LLaVA-1.5 checkpoints (AesExpert's `llava_llama`) -> transformers `LlavaForConditionalGeneration`.

The original checkpoint holds the Llama body and `model.mm_projector.{0,2}`; the CLIP vision tower lives in
its own repo (`mm_vision_tower`). Every key is mapped by name onto an instantiated model's `state_dict()`;
a key that maps nowhere, or a parameter left unfilled, is an error that lists the names.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from safetensors.torch import load_file
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor)

IMAGE_TOKEN = "<image>"
# LLaVA's `llava_v1` conversation (conv_vicuna_v1, separator style TWO: " " after a user turn, "</s>" after
# an answer). The image goes first in the user's turn, as LLaVA puts DEFAULT_IMAGE_TOKEN + "\n" before it.
LLAVA_V1_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
LLAVA_V1_TEMPLATE = (
    "{{ '" + LLAVA_V1_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' }}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{{ '</s>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
PROJECTORS = {"mlp2x_gelu": "gelu"}
# The Llama architecture fields of an original config.json; the rest (mm_*, training flags) is LLaVA's own.
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "attention_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id")
CONVERTED_MARK = "aesarena_llava.json"

_RULES: tuple[tuple[str, str], ...] = (
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^lm_head\.", "lm_head."),
)


class ConversionError(ValueError):
    """An original checkpoint that cannot be converted faithfully; the message names the keys or fields."""


@dataclass(frozen=True)
class ConversionReport:
    """What the conversion consumed and filled."""

    mapped: int
    vision_keys: int
    added_tokens: tuple[str, ...]
    image_aspect_ratio: str


def target_name(key: str) -> str | None:
    """The transformers name of an original LLaVA key, or None when it maps nowhere."""
    for pattern, replacement in _RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors or PyTorch checkpoint."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def _config(directory: Path) -> dict:
    raw = json.loads((directory / "config.json").read_text())
    for field in ("mm_vision_tower", "mm_projector_type", "mm_vision_select_layer"):
        if field not in raw:
            raise ConversionError(f"{directory}/config.json lacks {field!r}: not an original LLaVA checkpoint")
    if raw["mm_projector_type"] not in PROJECTORS:
        raise ConversionError(f"unknown mm_projector_type {raw['mm_projector_type']!r}; "
                              f"supported: {', '.join(PROJECTORS)}")
    return raw


def _local(source: str | Path) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched (and cached) by huggingface_hub."""
    path = Path(source)
    return path if path.is_dir() else Path(snapshot_download(str(source)))


def convert_original_llava(checkpoint: str | Path, vision_tower: str | Path | None = None,
                           ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, ConversionReport]:
    """Build the transformers model and processor from an original LLaVA-1.5 checkpoint and its vision tower."""
    directory = _local(checkpoint)
    raw = _config(directory)
    tower_dir = _local(vision_tower or raw["mm_vision_tower"])
    vision = CLIPVisionModel.from_pretrained(tower_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    added = tuple(t for t in (IMAGE_TOKEN,) if t not in tokenizer.get_vocab())
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    text_config = LlamaConfig(**{k: v for k, v in raw.items() if k in LLAMA_FIELDS})
    config = LlavaConfig(vision_config=vision.config, text_config=text_config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                         projector_hidden_act=PROJECTORS[raw["mm_projector_type"]],
                         vision_feature_layer=raw["mm_vision_select_layer"],
                         # LLaVA's "patch" select: drop CLS, keep the patch features.
                         vision_feature_select_strategy="default")
    model = LlavaForConditionalGeneration(config)
    targets = model.state_dict()

    state = _read_state(directory)
    renamed = {key: target_name(key) for key in state}
    unmapped = sorted(k for k, name in renamed.items() if name is None or name not in targets)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} checkpoint keys map nowhere: {', '.join(unmapped[:30])}")
    weights = {renamed[k]: v for k, v in state.items()}
    vision_state = vision.state_dict()
    for key, value in vision_state.items():
        weights["model.vision_tower." + key.removeprefix("vision_model.")] = value
    if added:  # the new <image> row never reaches the LM as text, but the embedding must have one
        vocab = len(tokenizer)
        for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            old = weights[name]
            weights[name] = torch.cat([old, old.mean(0, keepdim=True).expand(vocab - old.shape[0], -1)])
        model.resize_token_embeddings(vocab, mean_resizing=False)
        targets = model.state_dict()
    missing = sorted(set(targets) - set(weights))
    wrong = sorted(k for k in set(targets) & set(weights) if targets[k].shape != weights[k].shape)
    if missing or wrong:
        raise ConversionError(f"parameters left unfilled: {', '.join(missing[:30]) or 'none'}; "
                              f"wrong shapes: {', '.join(wrong[:30]) or 'none'}")
    model.load_state_dict({k: weights[k] for k in targets}, strict=True)
    processor = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(tower_dir), tokenizer=tokenizer,
                               patch_size=vision.config.patch_size, vision_feature_select_strategy="default",
                               chat_template=LLAVA_V1_TEMPLATE, num_additional_image_tokens=1)
    report = ConversionReport(len(state), len(vision_state), added, raw.get("image_aspect_ratio", "square"))
    return model.eval(), processor, report


def load_or_convert(checkpoint: str | Path, cache: Path, vision_tower: str | Path | None = None,
                    ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, str]:
    """The converted model from `cache`, converting and saving it there first; also LLaVA's image_aspect_ratio."""
    mark = cache / CONVERTED_MARK
    if not mark.is_file():
        model, processor, report = convert_original_llava(checkpoint, vision_tower)
        cache.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(cache)
        processor.save_pretrained(cache)
        # Written last: a crash mid-save leaves no mark, so the next start converts again.
        mark.write_text(json.dumps({"source": str(checkpoint), "image_aspect_ratio": report.image_aspect_ratio}))
    aspect = json.loads(mark.read_text())["image_aspect_ratio"]
    return (LlavaForConditionalGeneration.from_pretrained(cache).eval(), LlavaProcessor.from_pretrained(cache),
            aspect)
