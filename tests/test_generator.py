"""The text-to-image engine on the tiny random pipeline: loading, seeding, settings, LoRA, progress and safety."""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import AutoPipelineForText2Image, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from PIL import Image
from safetensors import safe_open
from transformers import CLIPConfig, CLIPImageProcessor

from engines.generator import (BlockedOutput, GenerationError, GeneratorConfig, Generator, InvalidRequest,
                               InvalidSettings)
from engines.registry import Profile, Registry, SystemSpec
from engines.tiny import write_tiny_lora, write_tiny_pipeline

PROMPT = "a photo of the cat"


@pytest.fixture(scope="session")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data home whose tiny pipeline is written once for the session."""
    home = tmp_path_factory.mktemp("generator-home")
    write_tiny_pipeline(home / "tiny")
    return home


def make(home: Path, **settings: Any) -> Generator:
    """A CPU float32 generator over the tiny pipeline, two steps unless told otherwise."""
    return Generator({"model": "tiny", "steps": 2, **settings}, device="cpu", dtype="float32", home=home)


@pytest.fixture(scope="session")
def generator(home: Path) -> Generator:
    """The plain tiny generator (Euler, no LoRA, no safety checker)."""
    return make(home)


@pytest.fixture(scope="session")
def base_png(generator: Generator) -> bytes:
    """The plain generator's image for PROMPT at seed 0."""
    return generator.generate(PROMPT, seed=0).png()


def test_tiny_pipeline_is_a_real_diffusers_folder(home: Path) -> None:
    folder = write_tiny_pipeline(home / "tiny")
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert write_tiny_pipeline(home / "tiny") == folder  # reused, not rewritten
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp
    assert {"vocab.json", "merges.txt"} <= {p.name for p in (folder / "tokenizer").iterdir()}
    index = json.loads((folder / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    pipe = AutoPipelineForText2Image.from_pretrained(folder)
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.tokenizer.model_max_length == 77
    # BPE merges are real: "the" and "cat" are one token each, between the start and end markers.
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("the cat").input_ids) == [
        "<|startoftext|>", "the</w>", "cat</w>", "<|endoftext|>"]


def test_same_seed_same_image_and_png_round_trips(generator: Generator, base_png: bytes) -> None:
    result = generator.generate(PROMPT, seed=0)
    assert result.png() == base_png
    assert result.image.size == (64, 64) and result.seed == 0 and result.prompt == PROMPT
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base_png))), np.asarray(result.image))


def test_different_seed_different_image(generator: Generator, base_png: bytes) -> None:
    assert generator.generate(PROMPT, seed=1).png() != base_png


def test_drawn_seed_and_echo_reproduce_the_image(generator: Generator, home: Path) -> None:
    result = generator.generate(f"  {PROMPT}\n")
    assert 0 <= result.seed < 2**32 and result.prompt == PROMPT
    echo = result.settings
    assert echo["width"] == echo["height"] == 64 and echo["scheduler"] == "EulerDiscreteScheduler"
    assert echo["pipeline"] == "StableDiffusionPipeline" and echo["device"] == "cpu" and echo["dtype"] == "float32"
    json.dumps(echo)  # storable with the comparison as is
    # A fresh generator built from the echoed settings alone makes the same bytes.
    settings = {key: echo[key] for key in GeneratorConfig.__dataclass_fields__}
    assert make(home, **settings).generate(result.prompt, seed=result.seed).png() == result.png()


@pytest.mark.parametrize(("settings", "message"), [
    ({"width": 100}, "multiple of 8"),
    ({"height": 4096}, "between 64 and 2048"),
    ({"width": 0}, "between 64 and 2048"),
    ({"steps": 0}, "steps must be between 1 and 150"),
    ({"steps": 2.5}, "steps must be an integer"),
    ({"steps": True}, "steps must be an integer"),
    ({"guidance_scale": -1}, "guidance_scale must be between 0.0 and 30.0"),
    ({"guidance_scale": 31}, "guidance_scale must be between"),
    ({"guidance_scale": float("nan")}, "guidance_scale must be between"),
    ({"scheduler": ""}, "scheduler class name"),
    ({"negative_prompt": 3}, "negative_prompt must be text"),
    ({"sampler": "euler"}, "unknown generator settings: sampler"),
    ({"model": ""}, "model must be"),
    ({"loras": "style.safetensors"}, "loras must be a list"),
    ({"loras": [{"path": "a"}, {"path": "b", "name": "lora0"}]}, "LoRA names must be distinct"),
    ({"loras": [{"path": "a", "name": "my.lora"}]}, "LoRA name must be"),
    ({"loras": [{"path": ""}]}, "a LoRA needs a path"),
    ({"loras": [{"path": "a", "scale": float("inf")}]}, "scale must be a finite number"),
    ({"loras": [{"path": "a", "weight": 1}]}, "each LoRA is a mapping"),
])
def test_bad_settings_are_refused_before_loading(settings: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidSettings, match=message):
        GeneratorConfig.from_settings({"model": "tiny", **settings})


def test_missing_model_is_refused() -> None:
    with pytest.raises(InvalidSettings, match="need a model"):
        GeneratorConfig.from_settings({"steps": 4})


@pytest.mark.parametrize("scheduler", ["NoSuchScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_unknown_or_incompatible_scheduler_is_refused(home: Path, scheduler: str) -> None:
    with pytest.raises(InvalidSettings, match="compatible: .*DDIMScheduler"):
        make(home, scheduler=scheduler)


def test_unknown_dtype_is_refused(home: Path) -> None:
    with pytest.raises(InvalidSettings, match="dtype must be one of"):
        Generator({"model": "tiny"}, device="cpu", dtype="float8", home=home)


def test_scheduler_swap(home: Path, base_png: bytes) -> None:
    ddim = make(home, scheduler="DDIMScheduler")
    assert type(ddim.pipeline.scheduler).__name__ == "DDIMScheduler"
    result = ddim.generate(PROMPT, seed=0)
    assert result.settings["scheduler"] == "DDIMScheduler"
    assert result.png() != base_png


@pytest.mark.parametrize("prompt", ["", "   \n\t", None])
def test_empty_prompt_is_refused(generator: Generator, prompt: Any) -> None:
    with pytest.raises(InvalidRequest, match="prompt is empty"):
        generator.generate(prompt, seed=0)


def test_over_long_prompt_is_refused_with_count_and_limit(generator: Generator) -> None:
    # "the" and "cat" are one token each: 2 per repeat, plus the start and end markers.
    with pytest.raises(InvalidRequest, match=r"82 tokens long.* at most 77"):
        generator.generate("the cat " * 40, seed=0)
    assert generator.generate("the cat " * 37 + "the", seed=0).image.size == (64, 64)  # exactly 77 fits


def test_over_long_negative_prompt_is_refused(home: Path) -> None:
    with pytest.raises(InvalidSettings, match=r"negative prompt is 82 tokens long.* at most 77"):
        make(home, negative_prompt="the cat " * 40)


def test_negative_prompt_changes_the_image(home: Path, base_png: bytes) -> None:
    assert make(home, negative_prompt="blurry").generate(PROMPT, seed=0).png() != base_png


@pytest.mark.parametrize("seed", [-1, 2**32, True, 1.5, "7"])
def test_bad_seed_is_refused(generator: Generator, seed: Any) -> None:
    with pytest.raises(InvalidRequest, match="seed must be a whole number"):
        generator.generate(PROMPT, seed=seed)


def test_lora_changes_the_image_and_scale_zero_is_the_base(home: Path, base_png: bytes) -> None:
    folder = write_tiny_lora(write_tiny_pipeline(home / "tiny"), home / "tiny" / "stable-diffusion-lora")
    weights = folder / "pytorch_lora_weights.safetensors"
    with safe_open(weights, "pt") as saved:
        assert all(key.startswith("unet.") for key in saved.keys())
    styled = make(home, loras=[{"path": "tiny", "scale": 1.0, "name": "style"}])  # "tiny" names that same LoRA
    assert styled.pipeline.get_active_adapters() == ["style"]
    result = styled.generate(PROMPT, seed=0)
    assert result.png() != base_png
    assert result.settings["loras"] == ({"path": "tiny", "scale": 1.0, "name": "style"},)
    muted = make(home, loras=[{"path": str(weights), "scale": 0.0}])
    assert muted.generate(PROMPT, seed=0).png() == base_png


def test_progress_is_reported_once_per_step(generator: Generator, base_png: bytes) -> None:
    calls: list[tuple[int, int]] = []
    with_progress = generator.generate(PROMPT, seed=0, progress=lambda step, total: calls.append((step, total)))
    assert calls == [(1, 2), (2, 2)]
    assert with_progress.png() == base_png  # reporting does not change the image


def _pipeline_with_checker(home: Path, out: Path, threshold: float) -> Path:
    """The tiny pipeline plus a tiny real safety checker: cosine − threshold > 0 flags, and cosines lie in [-1, 1]."""
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         vocab_size=99, bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    checker = StableDiffusionSafetyChecker(config)  # its random weights do not matter: the thresholds decide
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(threshold)
        checker.special_care_embeds_weights.fill_(threshold)
    base = StableDiffusionPipeline.from_pretrained(write_tiny_pipeline(home / "tiny"))
    components = {**base.components, "safety_checker": checker,
                  "feature_extractor": CLIPImageProcessor(size={"shortest_edge": 32},
                                                          crop_size={"height": 32, "width": 32})}
    StableDiffusionPipeline(**components, requires_safety_checker=True).save_pretrained(out)
    return out


def test_safety_checker_that_flags_blocks_the_output(home: Path, tmp_path: Path) -> None:
    folder = _pipeline_with_checker(home, tmp_path / "flags-all", threshold=-2.0)
    guarded = Generator({"model": str(folder), "steps": 2}, device="cpu", dtype="float32", home=home)
    assert guarded.pipeline.safety_checker is not None
    with pytest.raises(BlockedOutput, match="safety checker flagged"):
        guarded.generate(PROMPT, seed=0)


def test_safety_checker_that_passes_returns_the_image_untouched(home: Path, tmp_path: Path,
                                                                base_png: bytes) -> None:
    folder = _pipeline_with_checker(home, tmp_path / "passes-all", threshold=2.0)
    guarded = Generator({"model": str(folder), "steps": 2}, device="cpu", dtype="float32", home=home)
    assert guarded.generate(PROMPT, seed=0).png() == base_png


def test_errors_are_user_facing_value_errors() -> None:
    assert all(issubclass(cls, GenerationError) and issubclass(cls, ValueError)
               for cls in (InvalidSettings, InvalidRequest, BlockedOutput))


def test_registry_builds_the_generator(home: Path, base_png: bytes) -> None:
    spec = SystemSpec("tiny-sd", "engines.generator:Generator", {"model": "tiny", "steps": 2})
    registry = Registry(Profile(name="t", systems={"generation": (spec,)}), home)
    assert registry.engine("generation", "tiny-sd").generate(PROMPT, seed=0).png() == base_png
