"""Original-format LLaVA-1.5 checkpoints (AesExpert's `llava_llama`) -> transformers `LlavaForConditionalGeneration`.

The original checkpoint holds the Llama body and `model.mm_projector.{0,2}`; the CLIP vision tower lives in
its own repo (`mm_vision_tower`). Every key is renamed onto the parameter names of a `LlavaForConditionalGeneration`
instantiated (on the meta device) in the installed transformers; a key that maps nowhere, or a parameter left
unfilled, is an error that lists the names. The renamed weights are written once as a transformers checkpoint
under a cache folder, so later starts go straight through `from_pretrained`.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict, snapshot_download
from safetensors.torch import load_file
from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionModel, GenerationConfig, LlamaConfig,
                          LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

from engines.tiny import _write_once

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
# LLaVA's mm_vision_select_feature -> transformers' vision_feature_select_strategy ("patch" drops CLS).
SELECT_FEATURES = {"patch": "default", "cls_patch": "full"}
# LLaVA-1.5's image_aspect_ratio values; "anyres" and the rest belong to LLaVA-NeXT, another architecture.
ASPECT_RATIOS = ("square", "pad")
# The Llama architecture fields of an original config.json; the rest (mm_*, training flags) is LLaVA's own.
LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "rope_scaling", "attention_bias", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                "pad_token_id")
REPORT_FILE = "aesarena_llava.json"
# Only the weights and configs; Hub repos such as openai/clip-vit-* also hold TF, Flax and ONNX copies.
WEIGHT_FILES_ONLY = ["*.h5", "*.msgpack", "*.ot", "*.onnx", "*.tflite"]

_RULES: tuple[tuple[str, str], ...] = (
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
    (r"^lm_head\.", "lm_head."),
    # A tower trained along with the LLM (unfreeze_mm_vision_tower) is saved inside the checkpoint.
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
)
# Rotary frequencies that older transformers saved as buffers; they are derived from rope_theta, not learned.
_DERIVED = re.compile(r"\.rotary_emb\.inv_freq$")
_EMBEDDINGS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


class ConversionError(ValueError):
    """An original checkpoint that cannot be converted faithfully; the message names the keys or fields."""


@dataclass(frozen=True)
class ConversionReport:
    """What the conversion consumed and filled, kept beside the converted model."""

    source: str
    mapped: int  # original keys renamed onto parameters
    derived: int  # original keys dropped because transformers recomputes them (rotary inv_freq)
    vision_keys: int  # tower parameters taken from the separate vision tower
    vision_from_checkpoint: int  # tower parameters taken from the checkpoint itself
    added_tokens: tuple[str, ...]
    image_aspect_ratio: str


def target_name(key: str) -> str | None:
    """The transformers name of an original LLaVA key, or None when it maps nowhere."""
    for pattern, replacement in _RULES:
        if re.match(pattern, key):
            return re.sub(pattern, replacement, key)
    return None


def _listing(names: list[str], limit: int = 30) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _read_state(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (possibly sharded) safetensors or PyTorch checkpoint."""
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return {k: v for f in files for k, v in load_file(f).items()}
    files = sorted(directory.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in {directory}")
    return {k: v for f in files for k, v in torch.load(f, map_location="cpu", weights_only=True).items()}


def read_original_config(directory: Path) -> dict[str, Any]:
    """An original LLaVA-1.5 config.json, refused by field when it asks for something this conversion lacks."""
    raw = json.loads((directory / "config.json").read_text())
    for name in ("mm_vision_tower", "mm_projector_type", "mm_vision_select_layer"):
        if name not in raw:
            raise ConversionError(f"{directory}/config.json lacks {name!r}: not an original LLaVA checkpoint")
    checks = (("mm_projector_type", raw["mm_projector_type"], PROJECTORS),
              ("mm_vision_select_feature", raw.get("mm_vision_select_feature", "patch"), SELECT_FEATURES),
              ("image_aspect_ratio", raw.get("image_aspect_ratio", "square"), ASPECT_RATIOS))
    for name, value, known in checks:
        if value not in known:
            raise ConversionError(f"unknown {name} {value!r}; supported: {', '.join(known)}")
    if raw.get("mm_use_im_start_end"):
        raise ConversionError("mm_use_im_start_end is set: image start/end tokens are not part of LLaVA-1.5 and "
                              "are not supported")
    return raw


def _local(source: str | Path) -> Path:
    """A local folder as is; anything else is a Hub repo id, fetched (and cached) by huggingface_hub."""
    path = Path(source)
    return path if path.is_dir() else Path(snapshot_download(str(source), ignore_patterns=WEIGHT_FILES_ONLY))


def llava_config(raw: dict[str, Any], vision: Any, tokenizer: Any) -> LlavaConfig:
    """The transformers config equivalent to an original config.json, its vision tower and tokenizer."""
    text = LlamaConfig(**{**{k: v for k, v in raw.items() if k in LLAMA_FIELDS}, "vocab_size": len(tokenizer)})
    strategy = SELECT_FEATURES[raw.get("mm_vision_select_feature", "patch")]
    patches = (vision.image_size // vision.patch_size) ** 2
    return LlavaConfig(vision_config=vision, text_config=text,
                       image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
                       image_seq_length=patches + (strategy == "full"),
                       projector_hidden_act=PROJECTORS[raw["mm_projector_type"]],
                       vision_feature_layer=raw["mm_vision_select_layer"],
                       vision_feature_select_strategy=strategy,
                       tie_word_embeddings=raw.get("tie_word_embeddings", False))


def map_weights(state: dict[str, torch.Tensor], vision: dict[str, torch.Tensor],
                targets: dict[str, torch.Size], vocab: int) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Original tensors under their transformers names, checked one to one against `targets`, and counts."""
    derived = [k for k in state if _DERIVED.search(k)]
    renamed = {k: target_name(k) for k in state if k not in derived}
    unmapped = sorted(k for k, name in renamed.items() if name is None or name not in targets)
    if unmapped:
        raise ConversionError(f"{len(unmapped)} checkpoint keys map nowhere: {_listing(unmapped)}")
    # The separate tower first, so that a tower saved inside the checkpoint (trained with the LLM) wins.
    weights = {"model.vision_tower." + k.removeprefix("vision_model."): v for k, v in vision.items()}
    from_checkpoint = sum(name.startswith("model.vision_tower.") for name in renamed.values())
    weights.update({renamed[k]: state[k] for k in renamed})
    for name in _EMBEDDINGS:
        old = weights.get(name)
        if old is not None and old.shape[0] < vocab:
            # Added tokens (<image>) never reach the LM as text, yet the embedding needs a row for each:
            # the mean row, as transformers' own LLaVA conversion initializes them.
            weights[name] = torch.cat([old, old.float().mean(0, keepdim=True).to(old.dtype).expand(
                vocab - old.shape[0], -1)])
    missing = sorted(set(targets) - set(weights))
    wrong = sorted(f"{k} {tuple(weights[k].shape)} vs {tuple(targets[k])}"
                   for k in set(targets) & set(weights) if weights[k].shape != targets[k])
    if missing or wrong:
        raise ConversionError(f"parameters left unfilled: {_listing(missing) or 'none'}; "
                              f"wrong shapes: {_listing(wrong) or 'none'}")
    counts = {"mapped": len(renamed), "derived": len(derived), "vision_keys": len(vision),
              "vision_from_checkpoint": from_checkpoint}
    return {k: weights[k] for k in targets}, counts


def convert_original_llava(checkpoint: str | Path, out: Path, vision_tower: str | Path | None = None,
                           ) -> ConversionReport:
    """Write an original LLaVA-1.5 checkpoint and its vision tower into `out` as a transformers Llava checkpoint."""
    directory = _local(checkpoint)
    raw = read_original_config(directory)
    tower_dir = _local(vision_tower or raw["mm_vision_tower"])
    vision = CLIPVisionModel.from_pretrained(tower_dir)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    added = tuple(t for t in (IMAGE_TOKEN,) if t not in tokenizer.get_vocab())
    if added:
        tokenizer.add_special_tokens({"additional_special_tokens": list(added)})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token  # LLaVA v1 pads with <unk>
    config = llava_config(raw, vision.config, tokenizer)
    # Names and shapes only: on the meta device a 7B model costs no memory.
    with torch.device("meta"):
        targets = {k: v.shape for k, v in LlavaForConditionalGeneration(config).state_dict().items()}
    weights, counts = map_weights(_read_state(directory), vision.state_dict(), targets, len(tokenizer))
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out)
    GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id).save_pretrained(out)
    save_torch_state_dict(weights, out)
    LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(tower_dir), tokenizer=tokenizer,
                   patch_size=vision.config.patch_size, num_additional_image_tokens=1,
                   vision_feature_select_strategy=config.vision_feature_select_strategy,
                   chat_template=LLAVA_V1_TEMPLATE).save_pretrained(out)
    report = ConversionReport(source=str(checkpoint), added_tokens=added,
                              image_aspect_ratio=raw.get("image_aspect_ratio", "square"), **counts)
    (out / REPORT_FILE).write_text(json.dumps(asdict(report), indent=2))
    return report


def load_converted(folder: Path, dtype: torch.dtype | None = None,
                   ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, ConversionReport]:
    """A converted folder through `from_pretrained`, refused unless every parameter loads from it."""
    model, info = LlavaForConditionalGeneration.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    problems = {k: sorted(map(str, v)) for k, v in info.items() if k != "error_msgs" and v}
    if problems or info.get("error_msgs"):
        raise ConversionError(f"{folder} does not load cleanly: {problems or info['error_msgs']}")
    raw = json.loads((folder / REPORT_FILE).read_text())
    report = ConversionReport(**{**raw, "added_tokens": tuple(raw["added_tokens"])})
    return model.eval(), LlavaProcessor.from_pretrained(folder), report


def load_or_convert(checkpoint: str | Path, cache: Path, vision_tower: str | Path | None = None,
                    dtype: torch.dtype | None = None,
                    ) -> tuple[LlavaForConditionalGeneration, LlavaProcessor, ConversionReport]:
    """The converted model from `cache`, converting into it first (once, atomically) when it is not there."""
    _write_once(Path(cache), lambda staging: convert_original_llava(checkpoint, staging, vision_tower))
    return load_converted(Path(cache), dtype)
