"""The no-weights low-level aesthetic baseline: each feature moves the way its definition says."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from engines.aesthetic import AestheticError, LowLevelAesthetic, low_level_features


def _checkerboard(cell: int = 8) -> Image.Image:
    ys, xs = np.indices((64, 64)) // cell
    pixels = np.where(((ys + xs) % 2 == 0)[..., None], [240, 200, 30], [20, 30, 160]).astype(np.uint8)
    return Image.fromarray(pixels)


def test_a_colourful_sharp_image_beats_a_flat_grey_one() -> None:
    flat, board = low_level_features(Image.new("RGB", (64, 64), (128, 128, 128))), low_level_features(_checkerboard())
    for feature in ("colorfulness", "sharpness", "contrast", "saturation"):
        assert board[feature] > flat[feature] + 0.2, feature
    assert flat["colorfulness"] == flat["saturation"] == flat["sharpness"] == flat["contrast"] == 0.0


def test_blur_lowers_sharpness_and_overexposure_lowers_exposure() -> None:
    board = _checkerboard()
    assert low_level_features(board.filter(ImageFilter.GaussianBlur(3)))["sharpness"] < (
        0.5 * low_level_features(board)["sharpness"])
    assert low_level_features(Image.new("RGB", (32, 32), (250, 250, 250)))["exposure"] < 0.05
    assert low_level_features(Image.new("RGB", (32, 32), (128, 128, 128)))["exposure"] > 0.99


def test_grey_images_have_no_colour() -> None:
    grey = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40), dtype=np.uint8)).convert("RGB")
    features = low_level_features(grey)
    assert features["colorfulness"] == pytest.approx(0.0, abs=1e-9) and features["saturation"] == 0.0


def test_colourfulness_and_contrast_match_their_formulas_by_hand() -> None:
    # Two pixels: pure red and pure blue.
    image = Image.fromarray(np.array([[[255, 0, 0], [0, 0, 255]]], dtype=np.uint8))
    rg, yb = np.array([255.0, 0.0]), np.array([127.5, -255.0])
    expected = np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
    grey = np.array([0.299 * 255, 0.114 * 255]) / 255
    features = low_level_features(image)
    assert features["colorfulness"] == pytest.approx(min(expected / 100, 1.0))
    assert features["contrast"] == pytest.approx(2 * grey.std())


def test_scores_lie_in_zero_one_and_follow_the_weights(tmp_path: Path) -> None:
    images = [_checkerboard(), Image.new("RGB", (16, 16), (128, 128, 128))]
    scores = LowLevelAesthetic({}, device="cpu", dtype="float32", home=tmp_path).score(["", ""], images)["aesthetic"]
    assert ((0 <= scores) & (scores <= 1)).all() and scores[0] > scores[1]
    exposure_only = LowLevelAesthetic({"weights": {"exposure": 1.0}}, device="cpu", dtype="float32", home=tmp_path)
    assert exposure_only.score([""], images[1:])["aesthetic"][0] == pytest.approx(
        low_level_features(images[1])["exposure"])


@pytest.mark.parametrize("settings, message", [({"colour": 1}, "unknown low-level settings: colour"),
                                               ({"weights": {"beauty": 1.0}}, "unknown low-level feature"),
                                               ({"weights": {"exposure": -1.0}}, "non-negative"),
                                               ({"weights": {"exposure": float("inf")}}, "finite"),
                                               ({"weights": {"exposure": True}}, "finite"),
                                               ({"weights": {"exposure": 0.0}}, "not all zero"),
                                               ({"weights": [1.0, 1.0]}, "mapping of feature"),
                                               ({"weights": {}}, "mapping of feature"),
                                               ({"name": ""}, "name must be"),
                                               ({"name": 3}, "name must be")])
def test_settings_are_validated(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(AestheticError, match=message):
        LowLevelAesthetic(settings, device="cpu", dtype="float32", home=tmp_path)


def test_one_prompt_per_image(tmp_path: Path) -> None:
    with pytest.raises(AestheticError, match="one prompt per image"):
        LowLevelAesthetic({}, device="cpu", dtype="float32", home=tmp_path).score([""], [])


def test_sharpness_exposure_and_saturation_match_their_formulas_by_hand() -> None:
    # A 4x4 grey ramp with one bright pixel: the Laplacian has a 2x2 interior.
    grey = np.array([[10, 20, 30, 40], [50, 200, 70, 80], [90, 100, 110, 120], [130, 140, 150, 160]], dtype=np.uint8)
    g = grey.astype(np.float64)
    interior = [g[i - 1, j] + g[i + 1, j] + g[i, j - 1] + g[i, j + 1] - 4 * g[i, j] for i in (1, 2) for j in (1, 2)]
    features = low_level_features(Image.fromarray(grey).convert("RGB"))
    assert features["sharpness"] == pytest.approx(1 - np.exp(-np.var(interior) / 300.0))
    assert features["exposure"] == pytest.approx(1 - 2 * abs(g.mean() / 255 - 0.5))
    # Saturation: (max - min) / max per pixel, PIL's HSV rounds it to 0-255.
    pixels = np.array([[[255, 0, 0], [100, 50, 50]], [[20, 20, 20], [200, 200, 100]]], dtype=np.uint8)
    rgb = pixels.astype(np.float64)
    expected = np.mean((rgb.max(-1) - rgb.min(-1)) / rgb.max(-1))
    assert low_level_features(Image.fromarray(pixels))["saturation"] == pytest.approx(expected, abs=2 / 255)


def test_features_are_measured_at_a_fixed_size_and_on_any_mode() -> None:
    rng = np.random.default_rng(1)
    large = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)).resize((768, 512), Image.NEAREST)
    small = large.resize((256, 171), Image.BICUBIC)
    big, little = low_level_features(large), low_level_features(small)
    assert big == pytest.approx(little, abs=0.02)
    board = _checkerboard()
    for mode in ("L", "RGBA", "P", "CMYK"):
        features = low_level_features(board.convert(mode))
        assert set(features) == {"colorfulness", "sharpness", "exposure", "contrast", "saturation"}
        assert all(0.0 <= v <= 1.0 for v in features.values()), (mode, features)
    assert low_level_features(Image.new("RGB", (1, 1), (200, 10, 10)))["sharpness"] == 0.0


def test_scores_are_fixed_per_image_not_normalized_per_batch(tmp_path: Path) -> None:
    scorer = LowLevelAesthetic({}, device="cpu", dtype="float32", home=tmp_path)
    board, grey = _checkerboard(), Image.new("RGB", (16, 16), (128, 128, 128))
    alone = scorer.score([""], [board])["aesthetic"][0]
    together = scorer.score(["a", "b", "c"], [grey, board, grey])["aesthetic"]
    assert together[1] == pytest.approx(alone) and together[0] == pytest.approx(together[2])
    assert together[1] == pytest.approx(np.mean(list(low_level_features(board).values())))
    assert scorer.aspects == ("aesthetic",) and scorer.untrained_aspects == () and scorer.name == "Low-level features"
