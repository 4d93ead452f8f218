"""AesBench multiple-choice evaluation of a critic: accuracy per dimension, and how often answers are no option.

The data is AesBench's evaluation JSON: keyed by image name, each image holding `{Task}_data` entries (AesP_data,
AesE_data, AesA1_data, AesI_data, …) with a `Question` and an `Options` string ("A. Yes\\nB. No"), and for
scoring an `Answer` (a letter, "A. Yes", or the option's text). The prompt is AesBench's own. An outside
benchmark dropped AesExpert because its answers were not options, so that share is reported beside accuracy.

    python -m engines.aesbench --data AesBench_evaluation.json --images images/ --critic tiny-llava --profile tiny
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from engines.critic import GenerationSettings
from engines.images import ImageRejected, load_image

DIMENSIONS = ("AesP", "AesE", "AesA", "AesI")
MCQ_SUFFIX = (" Choose one from the following options:\n{options}\n"
              "You should output a correct option without explanation.")
_OPTION = re.compile(r"^\s*\(?([A-Z])[.):]\s*(.*?)\s*$")
_LETTER_ONLY = re.compile(r"^\(?([A-Z])[.):]?$")
_LETTER_FIRST = re.compile(r"^\(?([A-Z])[.):]\s")  # "B. No" or "(B) No", but not the article in "A good photo"
_LETTER_NAMED = re.compile(r"\b(?:option|answer(?: is)?)\s*:?\s*\(?([A-Z])\b", re.IGNORECASE)


class AesBenchError(ValueError):
    """Data that is not in AesBench's format, or images that cannot be used; the message says where."""


class Answers(Protocol):
    """What the evaluation needs from a critic."""

    def answer(self, image: Image.Image, question: str, history: Sequence[Any] = (),
               generation: GenerationSettings | None = None) -> str:
        """The critic's whole answer to one question about one image."""


@dataclass(frozen=True)
class Item:
    """One multiple-choice question about one image."""

    image: str
    task: str  # the data key without "_data": AesP, AesE, AesA1, …
    question: str
    options_text: str  # as the data gives it, for the prompt
    options: tuple[tuple[str, str], ...]  # (letter, text)
    answer: str | None  # the correct letter; None when the data holds no answer

    @property
    def dimension(self) -> str:
        """AesP, AesE, AesA or AesI (AesA1…AesA3 are AesA)."""
        return self.task[:4]

    def prompt(self) -> str:
        """AesBench's multiple-choice prompt for this question."""
        return self.question + MCQ_SUFFIX.format(options=self.options_text)


@dataclass
class Tally:
    """Counts for one dimension or task."""

    questions: int = 0
    scored: int = 0  # questions with a known answer
    correct: int = 0
    invalid: int = 0  # answers that name no option, or more than one

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    @property
    def invalid_share(self) -> float | None:
        return self.invalid / self.questions if self.questions else None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "accuracy": self.accuracy, "invalid_share": self.invalid_share}


@dataclass
class Report:
    """Accuracy and invalid-answer share per dimension and per task, and every response."""

    dimensions: dict[str, Tally] = field(default_factory=dict)
    tasks: dict[str, Tally] = field(default_factory=dict)
    overall: Tally = field(default_factory=Tally)
    skipped: int = 0  # open-ended entries (no Options), not multiple choice
    responses: dict[str, dict[str, str]] = field(default_factory=dict)  # AesBench's own results layout

    def as_dict(self) -> dict[str, Any]:
        return {"overall": self.overall.as_dict(), "skipped_open_ended": self.skipped,
                "dimensions": {k: v.as_dict() for k, v in self.dimensions.items()},
                "tasks": {k: v.as_dict() for k, v in self.tasks.items()}}


def parse_options(text: str) -> tuple[tuple[str, str], ...]:
    """'A. Yes\\nB. No' -> (('A', 'Yes'), ('B', 'No')); lines that are no option continue the one before."""
    options: list[tuple[str, str]] = []
    for line in text.splitlines():
        if match := _OPTION.match(line):
            options.append((match.group(1), match.group(2)))
        elif options and line.strip():
            options[-1] = (options[-1][0], f"{options[-1][1]} {line.strip()}")
    letters = [letter for letter, _ in options]
    if len(options) < 2 or len(set(letters)) != len(letters):
        raise AesBenchError(f"options must list two or more distinct lettered choices, got {text!r}")
    return tuple(options)


def _normal(text: str) -> str:
    return " ".join(text.lower().strip().rstrip(".").split())


def choice(response: str, options: Sequence[tuple[str, str]]) -> str | None:
    """The option letter a response names, or None when it names none or several."""
    letters = {letter for letter, _ in options}
    response = response.strip()
    for pattern in (_LETTER_ONLY, _LETTER_FIRST):
        if (match := pattern.match(response)) and match.group(1) in letters:
            return match.group(1)
    named = {m.group(1) for m in _LETTER_NAMED.finditer(response)} & letters
    if len(named) == 1:
        return named.pop()
    said = _normal(response)
    exact = [letter for letter, text in options if _normal(text) == said]
    if exact:
        return exact[0]
    within = [letter for letter, text in options
              if re.search(rf"(?<!\w){re.escape(_normal(text))}(?!\w)", said)]
    return within[0] if len(within) == 1 else None


def _answer_letter(raw: Any, options: Sequence[tuple[str, str]], where: str) -> str | None:
    if raw is None:
        return None
    letter = choice(str(raw), options)
    if letter is None:
        raise AesBenchError(f"{where}: the answer {raw!r} is none of the options")
    return letter


def load_items(data: Mapping[str, Any]) -> tuple[list[Item], int]:
    """The multiple-choice items of an AesBench JSON, and how many open-ended entries were left out."""
    if not isinstance(data, Mapping) or not data:
        raise AesBenchError("the data must be a JSON object keyed by image name")
    items, skipped = [], 0
    for image, entries in data.items():
        if not isinstance(entries, Mapping):
            raise AesBenchError(f"{image}: expected an object of {{Task}}_data entries")
        for key, entry in entries.items():
            task = key.removesuffix("_data")
            if not key.endswith("_data") or task[:4] not in DIMENSIONS:
                continue  # other fields (ground truth scores, notes) are not questions
            where = f"{image} / {key}"
            if not isinstance(entry, Mapping) or not isinstance(entry.get("Question"), str):
                raise AesBenchError(f"{where}: expected an object with a Question")
            if not entry.get("Options"):
                skipped += 1
                continue
            if not isinstance(entry["Options"], str):
                raise AesBenchError(f"{where}: Options must be a string of lettered lines")
            options = parse_options(entry["Options"])
            items.append(Item(image, task, entry["Question"], entry["Options"], options,
                              _answer_letter(entry.get("Answer"), options, where)))
    return items, skipped


def evaluate(critic: Answers, data: Mapping[str, Any], images: Path, *, max_new_tokens: int = 32,
             limit: int | None = None, progress: Callable[[int, int], None] | None = None) -> Report:
    """Ask the critic every multiple-choice question (greedy decoding) and tally the answers."""
    items, skipped = load_items(data)
    items = items[:limit] if limit is not None else items
    missing = sorted({item.image for item in items if not (Path(images) / item.image).is_file()})
    if missing:
        raise AesBenchError(f"{len(missing)} images are not in {images}: {', '.join(missing[:10])}")
    generation = GenerationSettings(max_new_tokens=max_new_tokens)
    report = Report(skipped=skipped)
    loaded: dict[str, Image.Image] = {}
    for done, item in enumerate(items, start=1):
        if item.image not in loaded:
            loaded.clear()  # items come image by image; keep one decoded image at a time
            try:
                loaded[item.image] = load_image(Path(images) / item.image)
            except ImageRejected as error:
                raise AesBenchError(f"{item.image}: {error}") from None
        response = critic.answer(loaded[item.image], item.prompt(), generation=generation)
        report.responses.setdefault(item.image, {})[f"{item.task}_response"] = response
        picked = choice(response, item.options)
        for tally in (report.overall, report.dimensions.setdefault(item.dimension, Tally()),
                      report.tasks.setdefault(item.task, Tally())):
            tally.questions += 1
            tally.invalid += picked is None
            if item.answer is not None:
                tally.scored += 1
                tally.correct += picked == item.answer
        if progress:
            progress(done, len(items))
    return report


def _critic(args: argparse.Namespace) -> Answers:
    """A critic from JSON settings, or a critique system of a profile."""
    from engines.critic import Critic
    from engines.registry import Registry, load_profile

    home = Path(args.home or os.environ.get("AESARENA_HOME", "data"))
    profile = load_profile(args.profile)
    if args.critic.lstrip().startswith("{"):
        return Critic(json.loads(args.critic), device=args.device or profile.device,
                      dtype=args.dtype or profile.dtype, home=home)
    return Registry(profile, home).engine("critique", args.critic)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line: evaluate, print the report as JSON, optionally write every response."""
    parser = argparse.ArgumentParser(prog="python -m engines.aesbench", description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="AesBench evaluation JSON")
    parser.add_argument("--images", type=Path, required=True, help="folder with the images the JSON names")
    parser.add_argument("--critic", required=True,
                        help="a critique system of --profile, or Critic settings as a JSON object")
    parser.add_argument("--profile", default="tiny", help="profile name or YAML path (default: tiny)")
    parser.add_argument("--home", type=Path, help="data home (default: $AESARENA_HOME or ./data)")
    parser.add_argument("--device", help="for JSON settings (default: the profile's)")
    parser.add_argument("--dtype", help="for JSON settings (default: the profile's)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--limit", type=int, help="ask only the first N questions")
    parser.add_argument("--responses", type=Path, help="write every response here, in AesBench's results layout")
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.data.read_text(encoding="utf-8"))
        report = evaluate(_critic(args), data, args.images, max_new_tokens=args.max_new_tokens, limit=args.limit,
                          progress=lambda done, total: print(f"{done}/{total}", file=sys.stderr))
    except (OSError, json.JSONDecodeError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.responses:
        args.responses.write_text(json.dumps(report.responses, indent=2, ensure_ascii=False), encoding="utf-8")
    print(json.dumps(report.as_dict(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
