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
                                               ({"weights": {"exposure": -1.0}}, "non-negative")])
def test_settings_are_validated(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(AestheticError, match=message):
        LowLevelAesthetic(settings, device="cpu", dtype="float32", home=tmp_path)


def test_one_prompt_per_image(tmp_path: Path) -> None:
    with pytest.raises(AestheticError, match="one prompt per image"):
        LowLevelAesthetic({}, device="cpu", dtype="float32", home=tmp_path).score([""], [])
