"""Ranked-DPO alignment of a ranker on the tiny CLIP with a planted preference: voters always prefer the row whose
images are more saturated. The aligned ranker must then put saturated images higher than its parent does."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from engines.embedder import Embedder, EmbedderError, text_tower_state
from engines.retrieval import Ranker
from engines.retrieval import main as retrieval_main
from study.blobs import BlobStore, Output
from study.db import default_url, make_engine, upgrade
from study.export import export_votes
from study.votes import Matchup, VoteService
from tests.conftest import _free_port
from train.data import PairFilter
from train.retrieval_dpo import (TEXT_TOWER, RetrievalDPOConfig, dpo_loss, grid_pairs, main, recall_refusal,
                                 train, vote_pairs)
from train.runs import RUN_CARD

CLIP = {"model": "aesarena-tiny-clip", "pretrained": "tiny"}
PARENT = {"method": "clip", "embedder": CLIP, "index": "test"}
IMAGES, ROW = 40, 5
HUES = ("red", "orange", "yellow", "green", "teal", "blue", "purple", "pink")


def _saturation(image: Image.Image) -> float:
    return float(np.asarray(image.convert("HSV"))[..., 1].mean() / 255)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """A folder of photos whose saturation runs from grey to vivid, with captions; file → saturation."""
    folder = tmp_path_factory.mktemp("gallery")
    rng = np.random.default_rng(0)
    lines, saturation = ["file,caption"], {}
    for i in range(IMAGES):
        hue, sat = HUES[i % len(HUES)], (i * 7 % IMAGES) / (IMAGES - 1)
        hsv = np.stack([np.full((48, 48), (i % len(HUES)) * 32 + rng.integers(0, 8)),
                        np.clip(sat * 255 + rng.normal(0, 10, (48, 48)), 0, 255),
                        np.clip(120 + rng.normal(0, 30, (48, 48)), 0, 255)], axis=-1).astype(np.uint8)
        image = Image.fromarray(hsv, "HSV").convert("RGB")
        image.save(folder / f"{i:02d}.png")
        saturation[f"{i:02d}.png"] = _saturation(image)
        lines.append(f"{i:02d}.png,a {'vivid' if sat > 0.5 else 'pale'} {hue} photo {i}")
    (folder / "gallery.csv").write_text("\n".join(lines) + "\n")
    return {"folder": str(folder), **saturation}


def _store(home: Path, gallery: dict[str, float], queries: int, seed: int) -> None:
    assert retrieval_main(["index", "--images", gallery["folder"], "--name", "test", "--home", str(home),
                           "--profile", "tiny"]) == 0
    engine = make_engine(default_url(home))
    upgrade(engine)
    votes = VoteService(engine, BlobStore(home / "blobs"))
    votes.register_system("retrieval", "clip", engine="engines.retrieval:Ranker", config=PARENT)
    votes.register_system("retrieval", "other")
    files = sorted(f for f in gallery if f != "folder")
    rng = np.random.default_rng(seed)
    for i in range(queries):
        picked = rng.permutation(files)[:2 * ROW]
        rows = [list(picked[:ROW]), list(picked[ROW:])]
        sides = [json.dumps({"query": f"query {i}", "items": [{"file": f} for f in row]}).encode() for row in rows]
        opened = votes.open_comparison(Matchup("retrieval", "clip", "other"), f"query {i}",
                                       *(Output(side, "application/json") for side in sides))
        a_wins = np.mean([gallery[f] for f in rows[0]]) > np.mean([gallery[f] for f in rows[1]])
        votes.record_vote(opened.token, "a" if a_wins else "b")


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory, gallery: dict[str, float]) -> Path:
    home = tmp_path_factory.mktemp("home")
    _store(home, gallery, queries=80, seed=1)
    return home


def _config(home: Path, out: Path, **changes) -> RetrievalDPOConfig:
    settings = dict(sources=("votes",), steps=60, batch_size=8, lr=3e-3, beta=0.5, nce_weight=0.2,
                    recall_tolerance=0.25, checkpoint_every=20)
    return RetrievalDPOConfig(home, out, "clip", **{**settings, **changes})


def _top_saturation(ranker: Ranker, gallery: dict[str, float], queries: list[str]) -> float:
    return float(np.mean([gallery[hit.file] for q in queries for hit in ranker.search(q, ROW).hits]))


def test_grid_pairs_are_the_partial_order() -> None:
    rows = np.arange(100, 116)  # 16 results in semantic order
    aesthetic = np.array([0, 3, 1, 2] * 4, dtype=np.float32)  # inside each tier of 4: 101 > 103 > 102 > 100
    pairs = grid_pairs(rows, aesthetic, tiers=2, places=4, stride=2)
    # stride 2 keeps rows 100, 102, …, 114: tiers (100, 102, 104, 106) and (108, …, 114), each re-ordered by
    # aesthetic: 102 (1) before 100 and 104/106 (0 and 1), so the first tier is 102, 106, 100, 104.
    assert len(pairs) == (2 * 3 // 2) * (4 * 5 // 2) - 2 * 4  # Σ dominated cells of a 2×4 grid
    assert (102, 100) in pairs and (100, 102) not in pairs  # same tier, better aesthetic first
    assert (102, 110) in pairs and (110, 102) not in pairs  # better tier and not worse place
    assert all(w != l for w, l in pairs) and len(set(pairs)) == len(pairs)
    assert grid_pairs(rows[:3], aesthetic[:3], tiers=4, places=4, stride=1) == []  # too few results for a tier


def test_vote_pairs_pair_ranks_of_images_unique_to_their_row() -> None:
    assert vote_pairs([1, 2, 3, None], [4, 2, 5, 6]) == [(1, 4), (3, 5)]
    assert vote_pairs([1, 2], [2, 1]) == []  # the same images in another order say nothing image-wise


def test_label_smoothing_keeps_a_confident_margin_from_vanishing_loss() -> None:
    margin, ref = torch.tensor([40.0]), torch.tensor([0.0])
    assert float(dpo_loss(margin, ref, beta=1.0, smoothing=0.0)) < 1e-6
    assert float(dpo_loss(margin, ref, beta=1.0, smoothing=0.1)) == pytest.approx(0.1 * 40, rel=1e-3)


def test_recall_guard_refuses_a_drop_beyond_the_tolerance() -> None:
    assert recall_refusal(0.60, 0.59, tolerance=0.02, k=5) is None
    assert "fell from 0.600 to 0.500" in recall_refusal(0.60, 0.50, tolerance=0.02, k=5)
    assert recall_refusal(None, None, tolerance=0.02, k=5) is None  # a gallery without held-out captions


def test_aligned_ranker_prefers_what_voters_preferred(home: Path, gallery: dict[str, float], tmp_path: Path) -> None:
    card = train(_config(home, tmp_path / "run"))
    metrics = card["metrics"]
    assert card["registered"] and card["data"]["votes"] == 80 and card["data"]["pairs"]["train"] > 100
    assert metrics["preference_accuracy_train_after"] > metrics["preference_accuracy_train_before"] + 0.1
    assert metrics["caption_recall_at_5_before"] is not None and metrics["caption_recall_at_5_after"] is not None
    assert json.loads((tmp_path / "run" / RUN_CARD).read_text())["system"] == "clip+aligned"

    votes = VoteService(make_engine(default_url(home)), BlobStore(home / "blobs"))
    aligned = {s.name: s for s in votes.systems("retrieval")}["clip+aligned"]
    assert aligned.source == "trained" and aligned.parent == "clip"
    assert aligned.run_card == json.loads((tmp_path / "run" / RUN_CARD).read_text())
    held_out = [f"new query {i}" for i in range(12)]
    parent = Ranker(PARENT, device="cpu", dtype="float32", home=home)
    trained = Ranker(aligned.config, device="cpu", dtype="float32", home=home)
    assert _top_saturation(trained, gallery, held_out) > _top_saturation(parent, gallery, held_out) + 0.1
    # Only the text tower moved: the image tower, and so the gallery index, is the parent's.
    probe = [Image.new("RGB", (32, 32), (200, 40, 40))]
    assert np.allclose(trained.embedder.embed_images(probe), parent.embedder.embed_images(probe))


def test_resume_continues_from_the_saved_step(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = train(_config(home, out, steps=20, name="resumed"))
    assert first["resumed_from_step"] is None and (out / "checkpoints" / "step-20").is_dir()
    second = train(_config(home, out, steps=30, name="resumed"))
    assert second["resumed_from_step"] == 20 and second["steps"] == 30


def test_grid_source_trains_on_the_parents_partial_order(home: Path, tmp_path: Path) -> None:
    card = train(_config(home, tmp_path / "run", sources=("grid",), queries=("a vivid photo", "a pale photo"),
                         steps=4, tiers=2, places=4, stride=2, name="grid", filters=PairFilter(test_share=0.0)))
    assert card["data"]["pairs"]["train"] == 2 * ((2 * 3 // 2) * (4 * 5 // 2) - 8)


def test_text_tower_file_must_match_the_architecture(home: Path, tmp_path: Path) -> None:
    embedder = Embedder(CLIP, device="cpu", dtype="float32", home=home)
    state = text_tower_state(embedder.model)
    save_file({k: v.contiguous() for k, v in list(state.items())[1:]}, tmp_path / "short.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    for name, message in (("short.safetensors", "missing"), ("junk.safetensors", "cannot read"),
                          ("absent.safetensors", "does not exist")):
        with pytest.raises(EmbedderError, match=message):
            Embedder({**CLIP, "text_weights": str(tmp_path / name)}, device="cpu", dtype="float32", home=home)


def test_cli_refuses_bad_input(home: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["--home", str(home), "--out", str(tmp_path / "x"), "--parent", "nobody"]) == 2
    assert "no retrieval system 'nobody'" in capsys.readouterr().err
    assert main(["--home", str(home), "--out", str(tmp_path / "x"), "--parent", "clip", "--sources", "guesses"]) == 2
    assert "sources must be" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert main(["--home", str(home), "--out", str(tmp_path / "x"), "--parent", "clip", "--sources", "grid",
                 "--queries", str(empty)]) == 2
    assert "holds no queries" in capsys.readouterr().err


def test_two_process_run_registers_once(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--main_process_port", str(_free_port()), "--mixed_precision", "no", "--dynamo_backend", "no",
               "-m", "train.retrieval_dpo", "--home", str(home),
               "--out", str(out), "--parent", "clip", "--name", "clip+ddp", "--sources", "votes", "--steps", "4",
               "--batch-size", "4", "--lr", "1e-3", "--recall-tolerance", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    card = json.loads((out / RUN_CARD).read_text())
    assert card["processes"] == 2 and card["steps"] == 4 and (out / TEXT_TOWER).is_file()
    votes = VoteService(make_engine(default_url(home)), BlobStore(home / "blobs"))
    assert [s.name for s in votes.systems("retrieval")].count("clip+ddp") == 1


def test_pairs_can_come_from_an_export(home: Path, tmp_path: Path) -> None:
    engine = make_engine(default_url(home))
    path = export_votes(engine, BlobStore(home / "blobs"), tmp_path / "export", task="retrieval")[0].path
    from_store = train(_config(home, tmp_path / "store", steps=1, name="from-store"))
    from_export = train(_config(home, tmp_path / "export-run", steps=1, name="from-export", export=path))
    assert from_export["data"]["votes"] == from_store["data"]["votes"] == 80
    assert from_export["data"]["pairs"] == from_store["data"]["pairs"]
