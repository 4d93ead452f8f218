"""open_clip embeddings, the LAION aesthetic head and CLIP score, on tiny random checkpoints."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.aesthetic import CLIP_SCORE_WEIGHT, AestheticError, ClipScore, LaionAesthetic, load_laion_head
from engines.embedder import Embedder, EmbedderError
from engines.tiny import TINY_OPEN_CLIP_CONFIG, write_tiny_laion_head

TINY = {"pretrained": "tiny"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module")
def embedder(home: Path) -> Embedder:
    return Embedder({**TINY, "batch_size": 2}, device="cpu", dtype="float32", home=home)


def test_tiny_checkpoint_loads_its_weights(embedder: Embedder, home: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(home / "tiny" / "open_clip" / "open_clip_model.safetensors")
    loaded = embedder.model.state_dict()
    assert set(saved) == set(loaded) and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert embedder.dim == TINY_OPEN_CLIP_CONFIG["embed_dim"]


def test_embeddings_are_unit_length_deterministic_and_batch_free(embedder: Embedder, images) -> None:
    batched = embedder.embed_images(images)
    one_by_one = np.concatenate([embedder.embed_images([im]) for im in images])
    assert batched.shape == (3, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(batched, one_by_one, atol=1e-5)
    texts = embedder.embed_texts(["a red fox", "a blue lake", "a red fox"])
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(texts[0], texts[2], atol=1e-6)
    assert not np.allclose(texts[0], texts[1])


def test_unknown_embedder_setting_is_refused(home: Path) -> None:
    with pytest.raises(EmbedderError, match="unknown embedder settings: colour"):
        Embedder({**TINY, "colour": "red"}, device="cpu", dtype="float32", home=home)


def test_laion_score_is_the_head_on_the_normalized_embedding(home: Path, embedder: Embedder, images) -> None:
    scorer = LaionAesthetic({"embedder": TINY, "head": "tiny"}, device="cpu", dtype="float32", home=home)
    scores = scorer.score(["ignored"] * 3, images)["aesthetic"]
    state = torch.load(write_tiny_laion_head(home / "tiny", embedder.dim), weights_only=True)
    x = torch.from_numpy(embedder.embed_images(images))
    for index in (0, 2, 4, 6, 7):  # no activations between the layers, as in the released predictor
        x = x @ state[f"layers.{index}.weight"].T + state[f"layers.{index}.bias"]
    np.testing.assert_allclose(scores, x.squeeze(-1).numpy(), atol=1e-5)
    assert (scorer.name, scorer.aspects, scorer.untrained_aspects) == ("LAION aesthetic", ("aesthetic",), ())


def test_laion_head_loading_is_strict(tmp_path: Path) -> None:
    path = write_tiny_laion_head(tmp_path, 32)
    state = torch.load(path, weights_only=True)
    for broken, message in (({**state, "layers.9.weight": torch.zeros(1)}, "unexpected \\['layers.9.weight'\\]"),
                            ({k: v for k, v in state.items() if k != "layers.7.bias"}, "missing \\['layers.7.bias'\\]")):
        torch.save(broken, tmp_path / "broken.pth")
        with pytest.raises(AestheticError, match=message):
            load_laion_head(tmp_path / "broken.pth", 32)
    with pytest.raises(AestheticError, match="wrong shapes"):
        load_laion_head(path, 768)


def test_clip_score_formula(home: Path, embedder: Embedder, images) -> None:
    scorer = ClipScore({"embedder": TINY}, device="cpu", dtype="float32", home=home)
    prompts = ["a red fox", "a blue lake", "an old map"]
    scores = scorer.score(prompts, images)["prompt_following"]
    cosine = np.sum(embedder.embed_texts(prompts) * embedder.embed_images(images), axis=1)
    np.testing.assert_allclose(scores, CLIP_SCORE_WEIGHT * np.maximum(cosine, 0), atol=1e-5)
    assert ((0 <= scores) & (scores <= CLIP_SCORE_WEIGHT)).all()
    with pytest.raises(AestheticError, match="one prompt per image"):
        scorer.score(prompts[:2], images)
