"""Critic fine-tuning on the tiny LLaVA with a planted preference: voters always prefer the critique that talks
about light and colour over the one that only complains. After DPO, with image adapters or with a LoRA, the trained
critic likes chosen answers more than its parent on held-out battles; SFT lowers held-out answer NLL; the trained
critic registers, loads and answers exactly as it was trained."""
from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, normalizers
from transformers import PreTrainedTokenizerFast

from engines.critic import Critic, CriticError
from study.blobs import BlobStore, Output
from study.db import default_url, make_engine, upgrade
from study.votes import Matchup, VoteService
from tests.conftest import _free_port
from train.critic import (ADAPTERS, LORA, WEIGHTS, CriticTrainConfig, Encoder, Example, answer_logprobs,
                          answer_token_count, main, train, vote_examples)
from train.data import PairFilter, load_pairs
from train.runs import RUN_CARD

PARENT = {"model": "tiny", "format": "llava-original", "generation": {"max_new_tokens": 8}}
GOOD = "good light and sharp color composition"  # words the tiny tokenizer knows
BAD = "it is blurry and poor"
FILTERS = PairFilter(test_share=0.25)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def _store(home: Path, choices: list[str]) -> VoteService:
    """A vote store with the tiny critic and one critique battle per choice, each with its uploaded image (as the
    critique tab keeps it), GOOD on side A for even battles; `choices` says what the voter picked."""
    engine = make_engine(default_url(home))
    upgrade(engine)
    votes = VoteService(engine, BlobStore(home / "blobs"))
    votes.register_system("critique", "tiny-llava", engine="engines.critic:Critic", config=PARENT)
    votes.register_system("critique", "other")
    for i, choice in enumerate(choices):
        image = votes.store_output(Output(_png(i), "image/png"))
        a, b = (GOOD, BAD) if i % 2 == 0 else (BAD, GOOD)
        opened = votes.open_comparison(Matchup("critique", "tiny-llava", "other"), f"how is picture {i}?",
                                       Output(a.encode(), "text/plain"), Output(b.encode(), "text/plain"),
                                       meta={"question": f"how is picture {i}?", "image": image})
        votes.record_vote(opened.token, choice)
    return votes


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Forty battles in which the voter always picks GOOD."""
    home = tmp_path_factory.mktemp("home")
    _store(home, ["a" if i % 2 == 0 else "b" for i in range(40)])
    return home


def _config(home: Path, out: Path, **changes) -> CriticTrainConfig:
    settings = dict(steps=30, batch_size=4, lr=3e-3, beta=0.5, checkpoint_every=10, filters=FILTERS)
    return CriticTrainConfig(home, out, "tiny-llava", **{**settings, **changes})


def _held_out(home: Path) -> list[Example]:
    blobs = BlobStore(home / "blobs")
    return [e for e in vote_examples(load_pairs(make_engine(default_url(home)), "critique", FILTERS), blobs)
            if e.split == "test"]


def _loglik_margin(critic: Critic, examples: list[Example]) -> float:
    """The served critic's mean log-likelihood margin chosen − rejected, through the trainer's encoding."""
    encode, margins = Encoder(critic), []
    for e in examples:
        batch = encode([(e.image, e.question, e.chosen), (e.image, e.question, e.rejected)])
        with torch.no_grad():
            logits = critic.model(**{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}).logits
        chosen, rejected = answer_logprobs(logits, batch)
        margins.append(float(chosen - rejected))
    return float(np.mean(margins))


@pytest.mark.parametrize("method", ["adapters", "lora"])
def test_dpo_raises_the_likelihood_of_chosen_answers_and_serves_it(method: str, home: Path, tmp_path: Path) -> None:
    card = train(_config(home, tmp_path / "run", method=method, lr=1e-2 if method == "lora" else 3e-3))
    metrics = card["metrics"]
    assert card["data"]["examples"]["test"] >= 5 and card["data"]["decided_votes"] == 40
    assert metrics["preference_accuracy_before"] == 0.5  # the parent is its own reference: every margin is zero
    assert metrics["preference_accuracy_after"] >= 0.8
    assert metrics["loglik_margin_after"] > metrics["loglik_margin_before"] + 1.0
    votes = VoteService(make_engine(default_url(home)), BlobStore(home / "blobs"))
    trained = {s.name: s for s in votes.systems("critique")}[f"tiny-llava+{method}"]
    assert (trained.source, trained.parent, trained.engine) == ("trained", "tiny-llava", "engines.critic:Critic")
    assert trained.version == card["data"]["hash"][:12] and trained.run_card["metrics"] == metrics
    critic = Critic(trained.config, device="cpu", dtype="float32", home=home)
    assert isinstance(critic.answer(Image.open(io.BytesIO(_png(0))).convert("RGB"), "how is it?"), str)
    # The saved and reloaded critic is the policy the run card measured, not the parent.
    held_out = _held_out(home)
    assert _loglik_margin(critic, held_out) == pytest.approx(metrics["loglik_margin_after"], abs=1e-3)
    parent = Critic(PARENT, device="cpu", dtype="float32", home=home)
    assert parent.adapters is None, "the parent critic is untouched by training"
    assert _loglik_margin(parent, held_out) == pytest.approx(metrics["loglik_margin_before"], abs=1e-4)
    if method == "adapters":
        assert (tmp_path / "run" / ADAPTERS).is_file() and critic.adapters is not None
        changed = set(load_file(tmp_path / "run" / WEIGHTS))  # ArtGPT-4's layer norms and the image projection
        norms = sorted(k.split("layers.")[1] for k in changed if "layernorm" in k)
        assert norms == ["0.input_layernorm.weight", "0.post_attention_layernorm.weight",
                         "1.post_attention_layernorm.weight"]
        assert any("multi_modal_projector" in k for k in changed)
    else:
        targets = json.loads((tmp_path / "run" / LORA / "adapter_config.json").read_text())["target_modules"]
        # q, k, v and o of both decoder layers of the language model; none of the vision tower's projections
        assert len(targets) == 8 and all("language_model" in t and "vision" not in t for t in targets)
        assert critic.adapters is None and not any("lora" in n for n, _ in critic.model.named_parameters())


def _sft_file(folder: Path, kind: str) -> Path:
    rows = []
    for i in range(24):
        Image.open(io.BytesIO(_png(100 + i))).save(folder / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": f"describe picture {i}", "answer": GOOD})
    path = folder / f"texts.{kind}"
    if kind == "csv":
        with path.open("w", newline="") as file:
            writer = csv.DictWriter(file, ["image", "question", "answer"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.mark.parametrize(("method", "kind"), [("adapters", "jsonl"), ("lora", "csv")])
def test_sft_lowers_held_out_answer_nll(method: str, kind: str, home: Path, tmp_path: Path) -> None:
    card = train(_config(home, tmp_path / "sft", method=method, objective="sft", texts=_sft_file(tmp_path, kind),
                         steps=40, lr=1e-2, name=f"tiny-llava+sft-{method}"))
    # The tiny LM's frozen head has weights of std 0.02 behind a frozen final norm, so no trainable part can move
    # its logits far from uniform (ln 43 = 3.76 nats): a drop of a quarter nat is most of what it allows.
    assert card["metrics"]["answer_nll_per_token_after"] < card["metrics"]["answer_nll_per_token_before"] - 0.25
    assert card["data"]["critiques"] == 24 and len(card["data"]["hash"]) == 64


def test_the_answer_mask_covers_the_served_answer_tokens(home: Path) -> None:
    critic = Critic(PARENT, device="cpu", dtype="float32", home=home)
    image = Image.open(io.BytesIO(_png(0))).convert("RGB")
    batch = Encoder(critic)([(image, "how is it?", GOOD), (image, "how is it?", BAD)])
    served = critic.inputs(image, "how is it?")["input_ids"][0]
    for row, answer in enumerate((GOOD, BAD)):
        ids, mask = batch["input_ids"][row], batch["answer_mask"][row]
        start = int(mask.nonzero()[0])
        assert torch.equal(ids[:start], served), "the prompt is the one the critic serves"
        assert critic.tokenizer.convert_ids_to_tokens(ids[mask]) == [*answer.split(), critic.tokenizer.eos_token]


def test_answer_tokens_are_counted_in_context() -> None:
    # A Llama-style SentencePiece tokenizer (a word start is "▁"; the text is prefixed with "▁") tokenizes " good"
    # alone as "▁", "▁good", but after a prompt as "▁good": the answer is the tokens it adds to its prompt.
    pieces = ["<unk>", "<s>", "</s>", "▁USER", ":", "▁ASSISTANT", "▁good", "▁light", "▁", "good", "light"]
    core = Tokenizer(models.Unigram([(p, -1.0 if p.startswith("▁") and len(p) > 1 else -5.0) for p in pieces],
                                    unk_id=0))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    assert len(tokenizer(" good light", add_special_tokens=False)["input_ids"]) == 3
    assert answer_token_count(tokenizer, "USER: ASSISTANT:", "USER: ASSISTANT: good light") == 2


def test_resume_continues_from_the_saved_step(home: Path, tmp_path: Path) -> None:
    first = train(_config(home, tmp_path / "run", steps=10, name="resumed"))
    trained = load_file(tmp_path / "run" / ADAPTERS)
    again = train(_config(home, tmp_path / "run", steps=10, name="resumed"))
    # Nothing left to do: what it saves is what the checkpoint held, not fresh adapters.
    assert again["resumed_from_step"] == 10 and again["first_loss"] is None
    assert all(torch.equal(v, load_file(tmp_path / "run" / ADAPTERS)[k]) for k, v in trained.items())
    assert again["metrics"] == first["metrics"]
    more = train(_config(home, tmp_path / "run", steps=12, name="resumed"))
    assert first["resumed_from_step"] is None and more["resumed_from_step"] == 10 and more["steps"] == 12
    assert json.loads((tmp_path / "run" / RUN_CARD).read_text())["steps"] == 12
    assert (tmp_path / "run" / "checkpoints" / "step-12").is_dir()


def _refused(argv: list[str], capsys: pytest.CaptureFixture) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_input_is_refused(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = ["--home", str(home), "--out", str(tmp_path / "x"), "--parent", "tiny-llava"]
    assert "no critique system 'nobody'" in _refused([*base[:-1], "nobody"], capsys)
    assert "SFT takes its critiques from --texts" in _refused([*base, "--objective", "sft"], capsys)
    (tmp_path / "missing.jsonl").write_text('{"image": "missing.png", "question": "q", "answer": "a"}\n')
    (tmp_path / "garbled.jsonl").write_text("{not json\n")
    (tmp_path / "short.csv").write_text("image,question\n0.png,how is it?\n")
    for name, message in [("missing.jsonl", "line 1: cannot read the image 'missing.png'"),
                          ("garbled.jsonl", "line 1: not JSON"),
                          ("short.csv", "line 2: expected non-empty text in each of image, question, answer")]:
        assert message in _refused([*base, "--objective", "sft", "--texts", str(tmp_path / name)], capsys)
    VoteService(make_engine(default_url(home)), BlobStore(home / "blobs")).register_system(
        "critique", "adapted", engine="engines.critic:Critic", config={**PARENT, "adapters": "a.safetensors"})
    assert "adapted already has trained adapters" in _refused([*base[:-1], "adapted"], capsys)
    with pytest.raises(SystemExit):
        main([*base, "--method", "prefix-tuning"])
    with pytest.raises(ValueError, match="method must be one of adapters, lora"):
        CriticTrainConfig(home, tmp_path, "tiny-llava", method="prefix-tuning")
    (tmp_path / "junk.safetensors").write_bytes(b"junk")
    with pytest.raises(CriticError, match="cannot read the trained weights"):
        Critic({**PARENT, "weights": str(tmp_path / "junk.safetensors")}, device="cpu", dtype="float32", home=home)
    with pytest.raises(CriticError, match="cannot load the LoRA"):
        Critic({**PARENT, "lora": str(tmp_path / "no-lora")}, device="cpu", dtype="float32", home=home)


def test_no_decided_votes_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _store(tmp_path, ["tie", "both_bad"] * 6)
    err = _refused(["--home", str(tmp_path), "--out", str(tmp_path / "x"), "--parent", "tiny-llava"], capsys)
    assert "no training examples: no decided critique votes" in err
    assert not (tmp_path / "x").exists()


def test_two_process_run_registers_once(home: Path, tmp_path: Path) -> None:
    accelerate = Path(sys.executable).with_name("accelerate")
    result = subprocess.run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                             "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend",
                             "no", "-m", "train.critic", "--home", str(home), "--out", str(tmp_path / "ddp"),
                             "--parent", "tiny-llava", "--method", "lora", "--name", "tiny-llava+ddp", "--steps", "3",
                             "--batch-size", "2"],
                            capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((tmp_path / "ddp" / RUN_CARD).read_text())
    assert card["processes"] == 2 and card["steps"] == 3 and card["method"] == "lora"
    assert result.stdout.count('"trainer": "train.critic"') == 1, "only the main process prints the card"
    votes = VoteService(make_engine(default_url(home)), BlobStore(home / "blobs"))
    assert [s.name for s in votes.systems("critique")].count("tiny-llava+ddp") == 1
    assert (tmp_path / "ddp" / LORA / "adapter_model.safetensors").is_file()
