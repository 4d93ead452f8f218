"""The LAION aesthetic head and CLIP score on the tiny open_clip checkpoint, checked against hand computations."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engines.aesthetic import (CLIP_SCORE_PREFIX, CLIP_SCORE_WEIGHT, AestheticError, ClipScore, ClipScoreSettings,
                               LaionAesthetic, LaionAestheticHead, LaionAestheticSettings, load_laion_head)
from engines.embedder import Embedder
from engines.registry import SCORERS, Registry, load_profile
from engines.tiny import TINY_OPEN_CLIP, write_tiny_laion_head

TINY = {"model": TINY_OPEN_CLIP, "pretrained": "tiny"}
CPU = {"device": "cpu", "dtype": "float32"}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("home")


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (40 + 8 * i, 48, 3), dtype=np.uint8)) for i in range(3)]


@pytest.fixture(scope="module")
def embedder(home: Path) -> Embedder:
    """An embedder of its own (not the shared one), so the hand computations below use an independent model."""
    return Embedder(TINY, home=home, **CPU)


@pytest.fixture(scope="module")
def laion(home: Path) -> LaionAesthetic:
    return LaionAesthetic({"embedder": TINY, "head": "tiny"}, home=home, **CPU)


@pytest.fixture(scope="module")
def clip_score(home: Path) -> ClipScore:
    return ClipScore({"embedder": TINY}, home=home, **CPU)


def test_head_is_the_released_layout() -> None:
    head = LaionAestheticHead(768)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == {"layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
                      "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
                      "layers.4.weight": (64, 128), "layers.4.bias": (64,),
                      "layers.6.weight": (16, 64), "layers.6.bias": (16,),
                      "layers.7.weight": (1, 16), "layers.7.bias": (1,)}
    assert [type(m).__name__ for m in head.layers] == ["Linear", "Dropout"] * 3 + ["Linear", "Linear"]
    assert [m.p for m in head.layers if isinstance(m, torch.nn.Dropout)] == [0.2, 0.2, 0.1]


def test_laion_score_is_the_head_on_the_normalized_embedding(laion: LaionAesthetic, embedder: Embedder,
                                                             images, home: Path) -> None:
    scores = laion.score(["a red fox", "a blue lake", "an old map"], images)
    assert set(scores) == set(laion.aspects) and scores["aesthetic"].dtype == np.float32
    x = torch.from_numpy(embedder.embed_images(images)).double()
    np.testing.assert_allclose(np.linalg.norm(x.numpy(), axis=1), 1.0, atol=1e-5)
    state = torch.load(write_tiny_laion_head(home / "tiny", embedder.dim), weights_only=True)
    for index in (0, 2, 4, 6, 7):  # no activations between the layers, and dropout is off at inference
        x = x @ state[f"layers.{index}.weight"].double().T + state[f"layers.{index}.bias"].double()
    np.testing.assert_allclose(scores["aesthetic"], x.squeeze(-1).numpy(), rtol=1e-5, atol=1e-5)
    # The prompt plays no part.
    np.testing.assert_array_equal(laion.score(["", "x", "y"], images)["aesthetic"], scores["aesthetic"])


def test_laion_head_loading_is_strict(tmp_path: Path) -> None:
    path = write_tiny_laion_head(tmp_path, 32)
    state = torch.load(path, weights_only=True)
    broken = tmp_path / "broken.pth"
    for bad, message in (({**state, "layers.9.weight": torch.zeros(1)}, r"unexpected keys: layers\.9\.weight"),
                         ({k: v for k, v in state.items() if k != "layers.7.bias"}, r"missing keys: layers\.7\.bias"),
                         ({"state_dict": state}, "not a plain state dict of tensors")):
        torch.save(bad, broken)
        with pytest.raises(AestheticError, match=message):
            load_laion_head(broken, 32)
    with pytest.raises(AestheticError, match=r"768-wide embeddings; wrong shapes: layers\.0\.weight \(1024, 32\) "
                                             r"\(expected \(1024, 768\)\)"):
        load_laion_head(path, 768)
    broken.write_text("not a checkpoint")
    with pytest.raises(AestheticError, match="not a readable PyTorch state dict"):
        load_laion_head(broken, 32)


def test_clip_score_is_hessels_formula(clip_score: ClipScore, embedder: Embedder, images) -> None:
    prompts = ["a red fox", "a blue lake", "an old map"]
    scores = clip_score.score(prompts, images)["prompt_following"]
    assert scores.dtype == np.float32 and scores.shape == (3,)
    texts = embedder.embed_texts([CLIP_SCORE_PREFIX + p for p in prompts])
    cosine = np.sum(texts * embedder.embed_images(images), axis=1)
    np.testing.assert_allclose(scores, CLIP_SCORE_WEIGHT * np.maximum(cosine, 0), atol=1e-5)
    assert ((0 <= scores) & (scores <= CLIP_SCORE_WEIGHT)).all()
    assert CLIP_SCORE_WEIGHT == 2.5 and CLIP_SCORE_PREFIX == "A photo depicts "


def test_clip_score_prefix_is_a_setting(home: Path, embedder: Embedder, images) -> None:
    bare = ClipScore({"embedder": TINY, "prefix": "", "name": "CLIP score (bare)"}, home=home, **CPU)
    cosine = np.sum(embedder.embed_texts(["a red fox"]) * embedder.embed_images(images[:1]), axis=1)
    np.testing.assert_allclose(bare.score(["a red fox"], images[:1])["prompt_following"],
                               CLIP_SCORE_WEIGHT * np.maximum(cosine, 0), atol=1e-5)
    assert bare.name == "CLIP score (bare)"


def test_scorers_meet_the_protocol_and_share_one_embedder(laion: LaionAesthetic, clip_score: ClipScore) -> None:
    assert (laion.name, laion.aspects, laion.untrained_aspects) == ("LAION aesthetic", ("aesthetic",), ())
    assert (clip_score.name, clip_score.aspects, clip_score.untrained_aspects) == (
        "CLIP score", ("prompt_following",), ())
    assert laion.embedder is clip_score.embedder
    for scorer in (laion, clip_score):
        assert {k: v.shape for k, v in scorer.score([], []).items()} == {scorer.aspects[0]: (0,)}
        with pytest.raises(AestheticError, match="2 prompts for 3 images"):
            scorer.score(["a", "b"], [Image.new("RGB", (8, 8))] * 3)
        with pytest.raises(AestheticError, match="prompts must be a list"):
            scorer.score("a", [Image.new("RGB", (8, 8))])
        with pytest.raises(AestheticError, match=r"prompts at positions \[1\] are not strings"):
            scorer.score(["a", None], [Image.new("RGB", (8, 8))] * 2)


def test_tiny_profile_scorers_build_through_the_registry(images, tmp_path: Path) -> None:
    registry = Registry(load_profile("tiny"), tmp_path)
    for name, aspect in (("LAION aesthetic", "aesthetic"), ("CLIP score", "prompt_following")):
        scores = registry.engine(SCORERS, name).score(["a red fox"] * 3, images)
        assert scores[aspect].shape == (3,) and np.isfinite(scores[aspect]).all()
    assert registry.engine(SCORERS, "LAION aesthetic").embedder is registry.engine(SCORERS, "CLIP score").embedder


@pytest.mark.parametrize(("kind", "settings", "message"), [
    (LaionAestheticSettings, {"embedder": TINY}, "need a `head`"),
    (LaionAestheticSettings, {"head": "tiny"}, "need an `embedder`"),
    (LaionAestheticSettings, {"embedder": TINY, "head": "tiny", "size": 3}, "unknown LAION aesthetic settings: size"),
    (LaionAestheticSettings, {"embedder": TINY, "head": "tiny", "name": ""}, "name must be a non-empty string"),
    (ClipScoreSettings, {"embedder": TINY, "weight": 100}, "unknown CLIP score settings: weight"),
    (ClipScoreSettings, {"embedder": TINY, "prefix": None}, "prefix must be a string"),
])
def test_bad_settings_are_refused(kind, settings, message: str) -> None:
    with pytest.raises(AestheticError, match=message):
        kind.from_settings(settings)


def test_missing_head_file_is_refused(home: Path) -> None:
    with pytest.raises(AestheticError, match="no LAION aesthetic head at .*nowhere.pth"):
        LaionAesthetic({"embedder": TINY, "head": "nowhere.pth"}, home=home, **CPU)
