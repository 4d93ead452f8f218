"""The open_clip embedder on the tiny random checkpoint, loaded through open_clip's own door."""
from __future__ import annotations

import gc
import shutil
import weakref
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from engines import embedder as embedder_module
from engines.embedder import Embedder, EmbedderError, EmbedderSettings, resolve_file, shared_embedder
from engines.tiny import TINY_OPEN_CLIP, TINY_OPEN_CLIP_CONFIG, write_tiny_open_clip

TINY = {"model": TINY_OPEN_CLIP, "pretrained": "tiny"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def embedder(home: Path) -> Embedder:
    # batch_size 2 over three inputs: one full batch and one partial one.
    return Embedder({**TINY, "batch_size": 2}, device="cpu", dtype="float32", home=home)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # Odd sizes and modes: open_clip's preprocessing resizes, crops and converts to RGB.
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(2)] + [
        Image.fromarray(rng.integers(0, 255, (50, 30), dtype=np.uint8), mode="L")]


def test_tiny_checkpoint_loads_through_create_model_and_transforms(home: Path) -> None:
    checkpoint = write_tiny_open_clip(home / "tiny")
    assert checkpoint.name == "open_clip_model.safetensors" and TINY_OPEN_CLIP in open_clip.list_models()
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_OPEN_CLIP, pretrained=str(checkpoint))
    saved, loaded = load_file(checkpoint), model.state_dict()
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert model.visual.output_dim == TINY_OPEN_CLIP_CONFIG["embed_dim"]
    assert preprocess(Image.new("RGB", (50, 40))).shape == (3, 32, 32)
    # Written once: a second call reuses the files and registers nothing new.
    assert write_tiny_open_clip(home / "tiny") == checkpoint


def test_embeddings_are_unit_length_deterministic_and_batch_free(embedder: Embedder, images) -> None:
    batched = embedder.embed_images(images)
    assert batched.shape == (3, embedder.dim) and batched.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, np.concatenate([embedder.embed_images([im]) for im in images]), atol=1e-5)
    np.testing.assert_array_equal(batched, embedder.embed_images(images))
    texts = embedder.embed_texts(["a red fox", "a blue lake", "a red fox"])
    assert texts.shape == (3, embedder.dim) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts, np.concatenate([embedder.embed_texts([t]) for t in
                                                      ["a red fox", "a blue lake", "a red fox"]]), atol=1e-5)
    np.testing.assert_array_equal(texts[0], texts[2])
    assert not np.allclose(texts[0], texts[1])
    assert embedder.embed_images([]).shape == embedder.embed_texts([]).shape == (0, embedder.dim)


def test_cpu_stays_float32_whatever_the_profile_dtype(embedder: Embedder, images, home: Path) -> None:
    half = Embedder(TINY, device="cpu", dtype="float16", home=home)
    np.testing.assert_allclose(half.embed_images(images), embedder.embed_images(images), atol=1e-6)


def test_a_checkpoint_path_is_read_under_the_home(embedder: Embedder, images, home: Path) -> None:
    shutil.copy(write_tiny_open_clip(home / "tiny"), home / "copy.safetensors")
    copy = Embedder({"model": TINY_OPEN_CLIP, "pretrained": "copy.safetensors"}, device="cpu", dtype="float32",
                    home=home)
    np.testing.assert_allclose(copy.embed_images(images), embedder.embed_images(images), atol=1e-6)


def test_hub_paths_go_through_hf_hub_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []
    monkeypatch.setattr(embedder_module, "hf_hub_download", lambda repo, name: calls.append((repo, name)) or "/x")
    assert resolve_file("hf://camenduru/improved-aesthetic-predictor/sac+logos+ava1-l14-linearMSE.pth",
                        tmp_path) == Path("/x")
    assert calls == [("camenduru/improved-aesthetic-predictor", "sac+logos+ava1-l14-linearMSE.pth")]
    with pytest.raises(EmbedderError, match="not hf://owner/repo/file"):
        resolve_file("hf://owner/only", tmp_path)
    assert resolve_file("sub/file.pt", tmp_path) == tmp_path / "sub" / "file.pt"
    assert resolve_file("/abs/file.pt", tmp_path) == Path("/abs/file.pt")


def test_scorers_on_the_same_settings_share_one_model(home: Path) -> None:
    first = shared_embedder(TINY, device="cpu", dtype="float32", home=home)
    assert shared_embedder(dict(TINY), device="cpu", dtype="float32", home=home) is first
    assert shared_embedder({**TINY, "batch_size": 3}, device="cpu", dtype="float32", home=home) is not first
    gone = weakref.ref(first)
    del first
    gc.collect()
    assert gone() is None, "the shared embedder must be freed once no engine holds it"


@pytest.mark.parametrize(("settings", "message"), [
    ({**TINY, "colour": "red"}, "unknown embedder settings: colour"),
    ({"pretrained": "tiny"}, "missing 1 required positional argument: 'model'"),
    ({"model": "ViT-L-14", "pretrained": "tiny"}, "the tiny checkpoint is for model 'aesarena-tiny-clip'"),
    ({"model": "ViT-L-14", "pretrained": "openai"}, "trained with quick_gelu=True but 'ViT-L-14' has quick_gelu=False"),
    ({"model": "ViT-B-32", "pretrained": "metaclip_400m"}, "ViT-L-14-quickgelu"),
    ({"model": "ViT-Q-99", "pretrained": "openai"}, "not an open_clip architecture"),
    ({"model": "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", "pretrained": "x"}, "name a built-in open_clip"),
    ({**TINY, "batch_size": 0}, "batch_size must be a positive integer"),
    ("tiny", "must be a mapping"),
])
def test_bad_settings_are_refused_before_any_model_loads(settings, message: str) -> None:
    with pytest.raises(EmbedderError, match=message):
        EmbedderSettings.from_settings(settings)


def test_real_profile_settings_pass_without_downloading() -> None:
    settings = EmbedderSettings.from_settings({"model": "ViT-L-14-quickgelu", "pretrained": "openai"})
    assert settings.is_tag


def test_missing_checkpoint_and_bad_inputs_are_refused(embedder: Embedder, home: Path) -> None:
    with pytest.raises(EmbedderError, match="neither an open_clip tag of ViT-B-32 .*openai.* nor a checkpoint"):
        Embedder({"model": "ViT-B-32", "pretrained": "nowhere.pt"}, device="cpu", dtype="float32", home=home)
    with pytest.raises(EmbedderError, match="dtype must be one of"):
        Embedder(TINY, device="cpu", dtype="float64", home=home)
    with pytest.raises(EmbedderError, match="texts must be a list"):
        embedder.embed_texts("a red fox")
    with pytest.raises(EmbedderError, match=r"texts at positions \[1\]"):
        embedder.embed_texts(["a", None])
    with pytest.raises(EmbedderError, match=r"images at positions \[0\]"):
        embedder.embed_images([np.zeros((4, 4, 3), dtype=np.uint8)])
