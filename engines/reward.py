"""VP-Score: an ImageReward-style BLIP reward model with one MLP head per aspect, and the scorer interface.

The backbone is transformers' own BLIP: `BlipVisionModel` (the ViT) and `BlipTextModel`, a BERT whose layers
cross-attend to every ViT token. The text encoder's [CLS] output feeds one ImageReward MLP per aspect, and each
raw reward r is reported standardized, (r - mean) / std. Two on-disk formats load into it:

- ImageReward's: `ImageReward.pt` (a plain state dict with the original BLIP key names), `med_config.json` and a
  BERT vocab. Keys are renamed one by one onto the transformers modules. A key that maps nowhere, or a parameter
  left unfilled, is an error that lists the names (ImageReward's own `strict=False` load hides both). The
  checkpoint has one head; it becomes `overall`, and the aspect heads start as copies of it, flagged untrained.
- Our own directory: `config.json` (`VPScoreConfig`), `model.safetensors` with every head, and tokenizer files.
  `save_vpscore` writes it and `load_vpscore` reads it; training saves this way.
"""
from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn
from torchvision.transforms import CenterCrop, InterpolationMode, Resize
from huggingface_hub import hf_hub_download
from transformers import BertTokenizer, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.initialization import no_init_weights
from transformers.models.blip.modeling_blip_text import BlipTextModel

from engines.settings import refuse_unknown
from engines.tiny import write_tiny_imagereward

# The overall judgement plus VisionPrefer's four aspects (study.tasks lists the same four for generation votes).
ASPECTS: tuple[str, ...] = ("overall", "prompt_following", "aesthetic", "fidelity", "harmlessness")
# ImageReward's standardization of its raw reward (ImageReward.py: self.mean, self.std).
IMAGEREWARD_MEAN = 0.16717362830052426
IMAGEREWARD_STD = 1.0333394966054072
# ImageReward normalizes images with CLIP's statistics, not ImageNet's.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Every ViT that BLIP ships (base 768/12, large 1024/16) uses 64-wide attention heads; a checkpoint's tensors
# give every other vision size, but not the head count.
BLIP_VISION_HEAD_WIDTH = 64
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FORMATS = ("imagereward", "vpscore")
FORMAT_MARKER = "aesarena-vpscore"
# What `write_tiny_imagereward` and ImageReward's download directory hold.
IMAGEREWARD_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"


class RewardError(ValueError):
    """A refusal whose message is meant for the person who configured or called the scorer."""


class InvalidSettings(RewardError):
    """A scorer's settings (from its profile) are malformed."""


class CheckpointMismatch(RewardError):
    """Checkpoint tensors and model parameters do not correspond one to one; the names are listed."""

    def __init__(self, source: str, *, unexpected: Sequence[str] = (), missing: Sequence[str] = (),
                 wrong_shape: Sequence[str] = (), problem: str = "") -> None:
        self.unexpected = tuple(unexpected)
        self.missing = tuple(missing)
        self.wrong_shape = tuple(wrong_shape)
        parts = [f"{source} does not fit the VP-Score model{': ' + problem if problem else ''}"]
        for title, names in (("checkpoint keys that map to no model parameter", self.unexpected),
                             ("model parameters that no checkpoint key fills", self.missing),
                             ("shape mismatches", self.wrong_shape)):
            if names:
                parts.append(f"{len(names)} {title}: {_listing(names)}")
        super().__init__("; ".join(parts))


def _listing(names: Sequence[str], limit: int = 30) -> str:
    # A wrong architecture can mismatch hundreds of keys; the exception keeps them all, the message the first few.
    shown = ", ".join(names[:limit])
    return shown + (f", … and {len(names) - limit} more" if len(names) > limit else "")


@dataclass(frozen=True)
class VPScoreConfig:
    """Everything that rebuilds a VP-Score model: backbone configs, heads, standardization and text length."""

    vision: dict[str, Any]  # BlipVisionConfig keyword arguments
    text: dict[str, Any]  # BlipTextConfig keyword arguments; encoder_hidden_size is the vision width
    aspects: tuple[str, ...] = ASPECTS
    head_widths: tuple[int, ...] = (1024, 128, 64, 16)
    head_dropout: tuple[float, ...] = (0.2, 0.2, 0.1)
    # aspect -> (mean, std) of its raw reward; a retrained head carries its own.
    standardization: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {aspect: (IMAGEREWARD_MEAN, IMAGEREWARD_STD) for aspect in ASPECTS})
    max_length: int = 35
    # Heads not trained for their aspect (copies of the overall head after an ImageReward load).
    untrained_aspects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.aspects or len(set(self.aspects)) != len(self.aspects):
            raise RewardError(f"aspects must be distinct and non-empty, got {self.aspects!r}")
        if set(self.standardization) != set(self.aspects):
            raise RewardError(f"standardization must give (mean, std) for exactly the aspects {self.aspects}, "
                              f"got {sorted(self.standardization)}")
        for aspect, (mean, std) in self.standardization.items():
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise RewardError(f"standardization of {aspect!r} needs a finite mean and a positive std, "
                                  f"got ({mean}, {std})")
        if not set(self.untrained_aspects) <= set(self.aspects):
            raise RewardError(f"untrained aspects {self.untrained_aspects} are not among {self.aspects}")
        if len(self.head_dropout) > len(self.head_widths):
            raise RewardError("a head has at most one dropout per hidden layer")
        if self.text.get("encoder_hidden_size") != self.vision.get("hidden_size"):
            raise RewardError("the text encoder's encoder_hidden_size must equal the vision width "
                              f"({self.text.get('encoder_hidden_size')} != {self.vision.get('hidden_size')})")
        if not 2 <= self.max_length <= self.text.get("max_position_embeddings", 512):
            raise RewardError(f"max_length {self.max_length} must be at least 2 and fit the position embeddings")

    @property
    def image_size(self) -> int:
        """The square side the ViT reads (its position embeddings fix it)."""
        return int(self.vision["image_size"])

    def vision_config(self) -> BlipVisionConfig:
        """The transformers config of the ViT."""
        return BlipVisionConfig(**self.vision)

    def text_config(self) -> BlipTextConfig:
        """The transformers config of the text encoder."""
        # is_decoder is what makes BlipTextLayer build its cross-attention; scoring still runs it bidirectionally.
        return BlipTextConfig(**self.text, is_decoder=True)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, tagged with the format name."""
        return {"format": FORMAT_MARKER, **asdict(self)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> VPScoreConfig:
        """The config from `to_dict` output; refuses files of other formats and unknown fields."""
        raw = dict(raw)
        if raw.pop("format", None) != FORMAT_MARKER:
            raise RewardError(f"not a VP-Score config (its 'format' is not {FORMAT_MARKER!r})")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(raw) - known):
            raise RewardError(f"unknown VP-Score config fields: {', '.join(unknown)}")
        for name in ("aspects", "head_widths", "head_dropout", "untrained_aspects"):
            if name in raw:
                raw[name] = tuple(raw[name])
        if "standardization" in raw:
            raw["standardization"] = {aspect: (float(m), float(s)) for aspect, (m, s) in raw["standardization"].items()}
        return cls(**raw)


class RewardHead(nn.Module):
    """ImageReward's MLP: Linear layers with dropout after the first three and, as released, no activations."""

    def __init__(self, width: int, hidden: Sequence[int], dropout: Sequence[float]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, out in enumerate(hidden):
            layers.append(nn.Linear(width, out))
            if i < len(dropout):
                layers.append(nn.Dropout(dropout[i]))
            width = out
        layers.append(nn.Linear(width, 1))
        # The layout (and so the key names layers.{0,2,4,6,7}) matches ImageReward's and LAION's `layers`.
        self.layers = nn.Sequential(*layers)
        for layer in self.layers:
            if isinstance(layer, nn.Linear):  # ImageReward's initialization of its MLP
                nn.init.normal_(layer.weight, std=1.0 / (self.layers[0].in_features + 1))
                nn.init.zeros_(layer.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Raw rewards, one per row."""
        return self.layers(features).squeeze(-1)


class VPScoreModel(nn.Module):
    """BLIP ViT + cross-attending BERT; the text [CLS] state feeds one reward head per aspect."""

    def __init__(self, config: VPScoreConfig) -> None:
        super().__init__()
        self.config = config
        self.vision_model = BlipVisionModel(config.vision_config())
        self.text_model = BlipTextModel(config.text_config(), add_pooling_layer=False)
        width = config.text["hidden_size"]
        self.heads = nn.ModuleDict({aspect: RewardHead(width, config.head_widths, config.head_dropout)
                                    for aspect in config.aspects})

    def features(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> torch.Tensor:
        """The text encoder's [CLS] state after cross-attending to all ViT tokens, in float32."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:2], dtype=torch.long, device=image_embeds.device)
        text = self.text_model(input_ids=input_ids, attention_mask=attention_mask,
                               encoder_hidden_states=image_embeds, encoder_attention_mask=image_mask)
        # ImageReward reads the features `.float()`, so the heads stay float32 under a half-precision backbone.
        return text.last_hidden_state[:, 0].float()

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw (unstandardized) rewards per aspect, each of shape (batch,)."""
        features = self.features(pixel_values, input_ids, attention_mask)
        return {aspect: head(features) for aspect, head in self.heads.items()}

    def standardize(self, raw: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """(r - mean) / std with each aspect's own statistics."""
        return {aspect: (r - self.config.standardization[aspect][0]) / self.config.standardization[aspect][1]
                for aspect, r in raw.items()}

    def place(self, device: str | torch.device, dtype: torch.dtype) -> VPScoreModel:
        """Move to `device`, the backbone in `dtype` and the heads in float32; eval mode."""
        self.to(device=device, dtype=dtype)
        self.heads.float()
        return self.eval()


@dataclass(frozen=True)
class LoadReport:
    """How a checkpoint was consumed: every key loaded or skipped for a stated reason, every parameter filled."""

    source: str
    loaded: tuple[str, ...]  # checkpoint keys copied into the model
    skipped: tuple[tuple[str, str], ...]  # (checkpoint key, why it is not needed)
    filled: tuple[str, ...]  # model state names that received a tensor
    copied_heads: tuple[str, ...] = ()  # aspect heads initialized as copies of the overall head


@dataclass(frozen=True)
class LoadedReward:
    """A loaded VP-Score model with its tokenizer and the report of the load."""

    model: VPScoreModel
    tokenizer: BertTokenizer
    report: LoadReport


def _load_exactly(model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str,
                  origin: Mapping[str, str]) -> tuple[str, ...]:
    """Copy `tensors` into `model`, refusing unless names and shapes correspond one to one."""
    expected = model.state_dict()
    unexpected = sorted(origin.get(name, name) for name in tensors if name not in expected)
    missing = sorted(name for name in expected if name not in tensors)
    wrong_shape = sorted(f"{origin.get(name, name)} {tuple(t.shape)} vs {name} {tuple(expected[name].shape)}"
                         for name, t in tensors.items() if name in expected and t.shape != expected[name].shape)
    if unexpected or missing or wrong_shape:
        raise CheckpointMismatch(source, unexpected=unexpected, missing=missing, wrong_shape=wrong_shape)
    model.load_state_dict(dict(tensors), strict=True)
    return tuple(sorted(tensors))


# Original BLIP ViT names (timm layout, under blip.visual_encoder.) -> transformers BlipVisionModel names.
# The installed BlipAttention keeps ViT's fused qkv projection, with the same (3, heads, head_dim) row order,
# so qkv maps as one tensor.
_VISION_RENAMES: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(a), b) for a, b in (
    (r"cls_token", r"embeddings.class_embedding"),
    (r"pos_embed", r"embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
))
_HEAD_KEY = re.compile(r"mlp\.layers\.(\d+)\.(weight|bias)")
# ITC projections of BLIP pretraining; the reward never reads them.
_UNUSED_KEY = re.compile(r"blip\.(vision_proj|text_proj)\.(weight|bias)")
_TEXT_POSITION_IDS = "blip.text_encoder.embeddings.position_ids"


def imagereward_name(key: str) -> str | None:
    """The VPScoreModel state name for an ImageReward checkpoint key, or None if no rule maps it."""
    if key.startswith("blip.visual_encoder."):
        rest = key.removeprefix("blip.visual_encoder.")
        for pattern, target in _VISION_RENAMES:
            if pattern.fullmatch(rest):
                return "vision_model." + pattern.sub(target, rest)
        return None
    if key.startswith("blip.text_encoder."):
        # BlipTextModel was adapted from BLIP's med.py BertModel and kept its module names.
        return "text_model." + key.removeprefix("blip.text_encoder.")
    if match := _HEAD_KEY.fullmatch(key):
        return f"heads.overall.layers.{match[1]}.{match[2]}"
    return None


def vision_from_tensors(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, Any]:
    """BlipVisionConfig arguments read off the ViT tensors (ImageReward.pt carries no vision config)."""
    needed = ("vision_model.embeddings.class_embedding", "vision_model.embeddings.position_embedding",
              "vision_model.embeddings.patch_embedding.weight", "vision_model.encoder.layers.0.mlp.fc1.weight")
    if absent := [name for name in needed if name not in tensors]:
        raise CheckpointMismatch(source, missing=absent, problem="the ViT's size cannot be read off the checkpoint")
    width = tensors[needed[0]].shape[-1]
    positions = tensors[needed[1]].shape[1]
    patch = tensors[needed[2]].shape[-1]
    grid = math.isqrt(positions - 1)
    if grid * grid != positions - 1 or width % BLIP_VISION_HEAD_WIDTH:
        raise CheckpointMismatch(source, problem=f"a ViT with {positions} positions and width {width} "
                                                 "is not a square-grid BLIP ViT")
    layers = {int(m[1]) for name in tensors if (m := re.match(r"vision_model\.encoder\.layers\.(\d+)\.", name))}
    return {
        "hidden_size": width,
        "intermediate_size": tensors[needed[3]].shape[0],
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": width // BLIP_VISION_HEAD_WIDTH,
        "image_size": grid * patch,
        "patch_size": patch,
        "hidden_act": "gelu",  # timm's nn.GELU, the exact (erf) form
        "layer_norm_eps": 1e-6,  # BLIP builds its ViT with LayerNorm(eps=1e-6)
    }


def _blip_tokenizer(directory: Path) -> BertTokenizer:
    """BERT's tokenizer from a local vocab, with [DEC] and [ENC] added as BLIP's init_tokenizer adds them."""
    if not (directory / "vocab.txt").is_file() and not (directory / "tokenizer.json").is_file():
        raise RewardError(f"no BERT vocab (vocab.txt or tokenizer.json) in {directory}")
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    # Both are no-ops for a vocab that already lists them; bert-base-uncased gets ids 30522 and 30523.
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


def _text_from_med_config(path: Path, tokenizer: BertTokenizer, vision_width: int) -> dict[str, Any]:
    """BlipTextConfig arguments from BLIP's med_config.json (a BertConfig) and the tokenizer."""
    med = json.loads(path.read_text())
    needed = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act", "hidden_dropout_prob",
              "attention_probs_dropout_prob")
    if absent := [name for name in needed if name not in med]:
        raise RewardError(f"{path} lacks the BERT config fields {', '.join(absent)}")
    if not med.get("add_cross_attention"):
        raise RewardError(f"{path} describes a BERT without cross-attention; ImageReward's text encoder has it")
    if med.get("position_embedding_type", "absolute") != "absolute":
        raise RewardError(f"{path}: only absolute position embeddings are supported")
    if len(tokenizer) != med["vocab_size"]:
        raise RewardError(f"the tokenizer has {len(tokenizer)} tokens but {path} says vocab_size "
                          f"{med['vocab_size']}; use BLIP's vocab (bert-base-uncased plus [DEC] and [ENC])")
    return {
        **{name: med[name] for name in needed},
        # ImageReward overrides med_config's encoder_width with the ViT's width, and so do we.
        "encoder_hidden_size": vision_width,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "sep_token_id": tokenizer.sep_token_id,
        "eos_token_id": tokenizer.sep_token_id,
    }


def load_imagereward(checkpoint: Path, med_config: Path | None = None, tokenizer: Path | None = None) -> LoadedReward:
    """An ImageReward-format checkpoint (`.pt` file or its directory) as a VP-Score model; strict on every name."""
    checkpoint = Path(checkpoint)
    if checkpoint.is_dir():
        checkpoint = checkpoint / IMAGEREWARD_FILE
    if not checkpoint.is_file():
        raise RewardError(f"no ImageReward checkpoint at {checkpoint}")
    med_config = Path(med_config) if med_config is not None else checkpoint.parent / MED_CONFIG_FILE
    if not med_config.is_file():
        raise RewardError(f"no med_config.json at {med_config}")
    source = str(checkpoint)
    # weights_only: a plain state dict needs no pickled code, and a hostile file cannot run any.
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping) or not all(isinstance(t, torch.Tensor) for t in state.values()):
        raise RewardError(f"{source} is not a plain state dict of tensors, as ImageReward.pt is")

    tensors: dict[str, torch.Tensor] = {}
    origin: dict[str, str] = {}
    skipped: list[tuple[str, str]] = []
    unmapped: list[str] = []
    for key, tensor in state.items():
        if _UNUSED_KEY.fullmatch(key):
            skipped.append((key, "image-text contrastive projection; the reward does not read it"))
        elif key == _TEXT_POSITION_IDS:
            # med.py saved position ids as a buffer; transformers rebuilds them, so they must be the plain 0..n-1.
            if not torch.equal(tensor.reshape(-1), torch.arange(tensor.numel())):
                raise CheckpointMismatch(source, problem=f"{key} is not 0..n-1; custom position ids are unsupported")
            skipped.append((key, "position-id buffer, equal to the 0..n-1 that transformers builds"))
        elif (name := imagereward_name(key)) is not None:
            tensors[name] = tensor
            origin[name] = key
        else:
            unmapped.append(key)
    if unmapped:
        raise CheckpointMismatch(source, unexpected=sorted(unmapped))

    vision = vision_from_tensors(tensors, source)
    # A vocab file (e.g. one fetched from the Hub) stands for the folder that holds it.
    tokenizer = Path(tokenizer) if tokenizer is not None else checkpoint.parent
    bert = _blip_tokenizer(tokenizer.parent if tokenizer.is_file() else tokenizer)
    text = _text_from_med_config(med_config, bert, vision["hidden_size"])
    aspects_to_copy = tuple(a for a in ASPECTS if a != "overall")
    config = VPScoreConfig(vision=vision, text=text, untrained_aspects=aspects_to_copy)
    # Every parameter is overwritten below (or the load fails), so skip the random initialization.
    with no_init_weights():
        model = VPScoreModel(config)
    # The aspect heads start from the overall head: a warm start for training, flagged untrained until then.
    # Only real head parameters are copied, so a stray mlp key is reported once, under its own name.
    head = model.heads["overall"].state_dict()
    for aspect in aspects_to_copy:
        for name in head:
            if (tensor := tensors.get(f"heads.overall.{name}")) is not None:
                tensors[f"heads.{aspect}.{name}"] = tensor.clone()
    filled = _load_exactly(model, tensors, source, origin)
    report = LoadReport(source=source, loaded=tuple(sorted(origin.values())), skipped=tuple(sorted(skipped)),
                        filled=filled, copied_heads=aspects_to_copy)
    return LoadedReward(model.eval(), bert, report)


def save_vpscore(directory: Path, model: VPScoreModel, tokenizer: BertTokenizer) -> Path:
    """Write the own format: config.json, model.safetensors (all heads) and the tokenizer files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    state = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(directory))
    return directory


def load_vpscore(directory: Path) -> LoadedReward:
    """Read what `save_vpscore` wrote; strict on every name and shape."""
    directory = Path(directory)
    config_path, weights = directory / "config.json", directory / "model.safetensors"
    if not config_path.is_file() or not weights.is_file():
        raise RewardError(f"{directory} is not a VP-Score directory (it needs config.json and model.safetensors)")
    config = VPScoreConfig.from_dict(json.loads(config_path.read_text()))
    tokenizer = BertTokenizer.from_pretrained(str(directory))
    if len(tokenizer) != config.text["vocab_size"]:
        raise RewardError(f"the tokenizer in {directory} has {len(tokenizer)} tokens, "
                          f"the model's vocab_size is {config.text['vocab_size']}")
    with no_init_weights():
        model = VPScoreModel(config)
    tensors = load_file(str(weights))
    filled = _load_exactly(model, tensors, str(weights), {})
    report = LoadReport(source=str(weights), loaded=filled, skipped=(), filled=filled)
    return LoadedReward(model.eval(), tokenizer, report)


class Scorer(Protocol):
    """What the app's tabs need from any scorer, so that several can be shown side by side."""

    @property
    def name(self) -> str:
        """The scorer's public name."""

    @property
    def aspects(self) -> tuple[str, ...]:
        """The keys of `score`'s result."""

    @property
    def untrained_aspects(self) -> tuple[str, ...]:
        """Aspects whose numbers were not trained for that aspect (the tab should say so)."""

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, np.ndarray]:
        """One standardized score per (prompt, image) pair and aspect."""


class RewardScorer:
    """Scores (prompt, image) pairs with a loaded VP-Score model: ImageReward's preprocessing, batched."""

    def __init__(self, loaded: LoadedReward, *, name: str = "VP-Score", device: str = "cpu",
                 dtype: str = "float32", batch_size: int = 8) -> None:
        if dtype not in DTYPES:
            raise InvalidSettings(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidSettings(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = loaded.model.place(device, DTYPES[dtype])
        self.tokenizer = loaded.tokenizer
        self.report = loaded.report
        self.config = self.model.config
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.batch_size = batch_size
        self._name = name
        size = self.config.image_size
        # ImageReward's transform, up to the RGB conversion; ToTensor and Normalize run batched in `pixel_values`.
        self._resize = Resize(size, interpolation=InterpolationMode.BICUBIC)
        self._crop = CenterCrop(size)
        self._mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)

    @property
    def name(self) -> str:
        """The scorer's public name."""
        return self._name

    @property
    def aspects(self) -> tuple[str, ...]:
        """The model's heads, overall first."""
        return self.config.aspects

    @property
    def untrained_aspects(self) -> tuple[str, ...]:
        """Heads that are copies of the overall head, not trained for their aspect."""
        return self.config.untrained_aspects

    def pixels(self, image: Image.Image) -> np.ndarray:
        """One image as ImageReward crops it: Resize(short side, bicubic), CenterCrop, RGB; HxWx3 uint8."""
        return np.asarray(self._crop(self._resize(image)).convert("RGB"), dtype=np.uint8)

    def pixel_values(self, pixels: Sequence[np.ndarray]) -> torch.Tensor:
        """ToTensor and Normalize(CLIP) for a batch at once, on the model's device (same float ops, same bits)."""
        batch = torch.from_numpy(np.stack(pixels)).to(self.device).permute(0, 3, 1, 2)
        values = batch.to(torch.float32).div(255)
        return ((values - self._mean) / self._std).to(self.dtype)

    def text_inputs(self, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and mask: padded to max_length, truncated, the leading [CLS] kept (as ImageReward)."""
        encoded = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                 max_length=self.config.max_length, return_tensors="pt")
        return encoded["input_ids"].to(self.device), encoded["attention_mask"].to(self.device)

    def inputs(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> dict[str, torch.Tensor]:
        """The model's keyword inputs for a batch of pairs."""
        input_ids, attention_mask = self.text_inputs(prompts)
        return {"pixel_values": self.pixel_values([self.pixels(image) for image in images]),
                "input_ids": input_ids, "attention_mask": attention_mask}

    def score(self, prompts: Sequence[str], images: Sequence[Image.Image],
              batch_size: int | None = None) -> dict[str, np.ndarray]:
        """Standardized scores per aspect, float32 arrays aligned with the pairs."""
        if isinstance(prompts, str):
            raise RewardError("prompts must be a list of strings, one per image")
        if len(prompts) != len(images):
            raise RewardError(f"{len(prompts)} prompts for {len(images)} images; give one prompt per image")
        if bad := [i for i, p in enumerate(prompts) if not isinstance(p, str)]:
            raise RewardError(f"prompts at positions {bad} are not strings")
        if bad := [i for i, im in enumerate(images) if not isinstance(im, Image.Image)]:
            raise RewardError(f"images at positions {bad} are not PIL images")
        size = self.batch_size if batch_size is None else batch_size
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise RewardError(f"batch_size must be a positive integer, got {size!r}")
        parts: dict[str, list[np.ndarray]] = {aspect: [] for aspect in self.aspects}
        with torch.inference_mode():
            for start in range(0, len(images), size):
                raw = self.model(**self.inputs(prompts[start:start + size], images[start:start + size]))
                for aspect, values in self.model.standardize(raw).items():
                    parts[aspect].append(values.cpu().numpy().astype(np.float32))
        return {aspect: np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.float32)
                for aspect, chunks in parts.items()}


@dataclass(frozen=True)
class VPScoreSettings:
    """A VP-Score system's settings: which checkpoint, in which format; relative paths are under the data home."""

    checkpoint: str  # "tiny", an ImageReward .pt file or its directory, or a VP-Score directory
    format: str  # "imagereward" or "vpscore"
    med_config: str | None = None  # imagereward only; default: med_config.json beside the checkpoint
    tokenizer: str | None = None  # imagereward only; a directory with vocab.txt; default: the checkpoint's
    name: str = "VP-Score"
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise InvalidSettings(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not isinstance(self.checkpoint, str) or not self.checkpoint.strip():
            raise InvalidSettings(f"checkpoint must be 'tiny' or a path, got {self.checkpoint!r}")
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidSettings(f"name must be a non-empty string, got {self.name!r}")
        if self.format == "vpscore" and (self.med_config or self.tokenizer):
            raise InvalidSettings("med_config and tokenizer are ImageReward-format settings; a VP-Score "
                                  "directory carries its own")
        if self.checkpoint == "tiny" and (self.format != "imagereward" or self.med_config or self.tokenizer):
            raise InvalidSettings("the tiny VP-Score is written in ImageReward format with its own med_config "
                                  "and vocab; use format: imagereward and nothing else")

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> VPScoreSettings:
        """Validated settings; unknown keys are refused by name."""
        refuse_unknown(settings, cls, "VP-Score", InvalidSettings)
        try:
            return cls(**settings)
        except TypeError as error:  # a required key is absent
            raise InvalidSettings(f"VP-Score settings: {error}") from None


HUB_PREFIX = "hf://"


class VPScore(RewardScorer):
    """The registry's VP-Score engine: `VPScore(settings, device=…, dtype=…, home=…).score(prompts, images)`."""

    def __init__(self, settings: Mapping[str, Any], *, device: str, dtype: str, home: Path) -> None:
        self.settings = VPScoreSettings.from_settings(settings)
        home = Path(home)

        def under_home(path: str | None) -> Path | None:
            if path is None:
                return None
            if path.startswith(HUB_PREFIX):  # hf://owner/repo/file: a file of a Hub repo, cached by huggingface_hub
                owner, repo, filename = path.removeprefix(HUB_PREFIX).split("/", 2)
                return Path(hf_hub_download(f"{owner}/{repo}", filename))
            return home / Path(path).expanduser()  # an absolute path stays as it is

        s = self.settings
        if s.checkpoint == "tiny":
            loaded = load_imagereward(write_tiny_imagereward(home / "tiny"))
        elif s.format == "imagereward":
            loaded = load_imagereward(under_home(s.checkpoint), under_home(s.med_config), under_home(s.tokenizer))
        else:
            loaded = load_vpscore(under_home(s.checkpoint))
        super().__init__(loaded, name=s.name, device=device, dtype=dtype, batch_size=s.batch_size)

