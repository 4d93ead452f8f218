"""AesBench multiple-choice evaluation on a small fixture in AesBench's own JSON layout."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from engines.aesbench import AesBenchError, choice, evaluate, load_items, main, parse_options
from engines.critic import Critic

OPTIONS = "A. Yes\nB. No"
LEVELS = "A. High\nB. Medium\nC. Low"


def _fixture(folder: Path) -> tuple[dict[str, Any], Path]:
    """Two images with AesP, AesE, AesA1 and AesI questions (AesI once open-ended), written as AesBench does."""
    images = folder / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("ss01 (1).jpg", "ss02 (2).jpg"):
        Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)).save(images / name)
    data = {
        "ss01 (1).jpg": {
            "AesP_data": {"Question": "Is the image sharp?", "Options": OPTIONS, "Answer": "A. Yes"},
            "AesE_data": {"Question": "Does the image feel calm?", "Options": OPTIONS, "Answer": "B"},
            "AesA1_data": {"Question": "What is the aesthetic level of the image?", "Options": LEVELS,
                           "Answer": "Low"},
            "AesI_data": {"Question": "Why is the composition pleasing?",
                          "Options": "A. The rule of thirds\nB. Symmetry\nC. Leading lines", "Answer": "C"},
        },
        "ss02 (2).jpg": {
            "AesP_data": {"Question": "Is the light natural?", "Options": OPTIONS, "Answer": "B. No"},
            "AesA1_data": {"Question": "What is the aesthetic level of the image?", "Options": LEVELS,
                           "Answer": "A"},
            "AesI_data": {"Question": "Interpret the aesthetics of this image."},  # open-ended
            "MOS": 0.42,
        },
    }
    path = folder / "AesBench_evaluation.json"
    path.write_text(json.dumps(data), encoding="utf-8")
    return data, images


class Scripted:
    """A stand-in critic that answers each question with a fixed string, to check the tallies exactly."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers, self.prompts = answers, []

    def answer(self, image: Image.Image, question: str, history: Sequence[Any] = (), generation=None) -> str:
        self.prompts.append(question)
        return self.answers[question.split(" Choose one")[0]]


@pytest.mark.parametrize("response, expected", [
    ("A", "A"), ("B.", "B"), ("(C) Low", "C"), ("C. Low", "C"), ("The answer is B", "B"), ("Option: C", "C"),
    ("low", "C"), ("Medium.", "B"), ("It is medium, I think", "B"), ("A good photo", None),
    ("High or low", None), ("D", None), ("", None), ("I cannot tell", None),
])
def test_choice_reads_an_answer_or_refuses_it(response: str, expected: str | None) -> None:
    assert choice(response, parse_options(LEVELS)) == expected


def test_malformed_data_is_refused_with_its_place() -> None:
    with pytest.raises(AesBenchError, match="two or more distinct"):
        parse_options("A. Yes\nA. No")
    with pytest.raises(AesBenchError, match="img.jpg / AesP_data: the answer 'D' is none of the options"):
        load_items({"img.jpg": {"AesP_data": {"Question": "q", "Options": OPTIONS, "Answer": "D"}}})
    with pytest.raises(AesBenchError, match="img.jpg / AesE_data: expected an object with a Question"):
        load_items({"img.jpg": {"AesE_data": {"Options": OPTIONS}}})
    with pytest.raises(AesBenchError, match="keyed by image"):
        load_items([])


def test_tallies_per_dimension_and_task(tmp_path: Path) -> None:
    data, images = _fixture(tmp_path)
    critic = Scripted({"Is the image sharp?": "A", "Does the image feel calm?": "Yes, very calm.",
                       "What is the aesthetic level of the image?": "C. Low",
                       "Why is the composition pleasing?": "Leading lines", "Is the light natural?": "maybe"})
    report = evaluate(critic, data, images)
    assert critic.prompts[0] == ("Is the image sharp? Choose one from the following options:\nA. Yes\nB. No\n"
                                 "You should output a correct option without explanation.")
    result = report.as_dict()
    assert result["skipped_open_ended"] == 1
    assert result["overall"] == {"questions": 6, "scored": 6, "correct": 3, "invalid": 1, "accuracy": 0.5,
                                      "invalid_share": 1 / 6}
    dims = result["dimensions"]
    assert (dims["AesP"]["correct"], dims["AesP"]["invalid"], dims["AesP"]["accuracy"]) == (1, 1, 0.5)
    assert (dims["AesE"]["accuracy"], dims["AesE"]["invalid_share"]) == (0.0, 0.0)  # "Yes" is A, the answer is B
    assert dims["AesA"]["accuracy"] == 0.5 and result["tasks"]["AesA1"] == dims["AesA"]
    assert dims["AesI"]["accuracy"] == 1.0
    assert report.responses["ss02 (2).jpg"] == {"AesP_response": "maybe", "AesA1_response": "C. Low"}


def test_the_tiny_critic_end_to_end_through_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, images = _fixture(tmp_path)
    home = tmp_path / "home"
    settings = json.dumps({"model": "tiny", "format": "llava-original"})
    code = main(["--data", str(tmp_path / "AesBench_evaluation.json"), "--images", str(images), "--critic", settings,
                 "--home", str(home), "--max-new-tokens", "6", "--responses", str(tmp_path / "responses.json")])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    responses = json.loads((tmp_path / "responses.json").read_text())
    # The report agrees with the responses the real model gave, read back by hand.
    items, _ = load_items(data)
    picked = [choice(responses[item.image][f"{item.task}_response"], item.options) for item in items]
    assert result["overall"]["questions"] == len(items) == 6
    assert result["overall"]["invalid"] == sum(p is None for p in picked)
    assert result["overall"]["correct"] == sum(p == item.answer for p, item in zip(picked, items))
    critic = Critic({"model": "tiny", "format": "llava-original", "generation": {"max_new_tokens": 6}},
                    device="cpu", dtype="float32", home=home)
    first = items[0]
    image = Image.open(images / first.image).convert("RGB")
    assert responses[first.image][f"{first.task}_response"] == critic.answer(image, first.prompt())


def test_missing_images_are_named(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data, images = _fixture(tmp_path)
    (images / "ss02 (2).jpg").unlink()
    with pytest.raises(AesBenchError, match=r"1 images are not in .*: ss02 \(2\).jpg"):
        evaluate(Scripted({}), data, images)
    assert main(["--data", str(tmp_path / "AesBench_evaluation.json"), "--images", str(images),
                 "--critic", "no-such-critic", "--home", str(tmp_path / "home")]) == 2
    assert "no-such-critic" in capsys.readouterr().err
