"""VP-Score: ImageReward loading is exact and loud, scoring follows ImageReward's recipe, the own format round-trips."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor

from engines.reward import (ASPECTS, IMAGEREWARD_MEAN, IMAGEREWARD_STD, CheckpointMismatch, InvalidSettings,
                            RewardError, RewardScorer, VPScore, VPScoreConfig, load_imagereward, load_vpscore,
                            save_vpscore, vision_from_tensors)
from engines.tiny import write_tiny_imagereward
from study.tasks import TASK_ASPECTS

PROMPTS = ["a red cat", "a painting of mountains at sunset", "", "dog", "the blue sky over the city at night"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_imagereward(tmp_path_factory.mktemp("home") / "tiny")


@pytest.fixture(scope="module")
def scorer(tiny_dir: Path) -> RewardScorer:
    return RewardScorer(load_imagereward(tiny_dir))


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    # Odd sizes and modes: the resize, crop and RGB conversion all have work to do.
    sizes = [(40, 32), (32, 57), (100, 100), (33, 33), (64, 48)]
    made = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    made[3] = made[3].convert("L")
    return made


def state_dict(tiny_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(tiny_dir / "ImageReward.pt", weights_only=True)


def copy_checkpoint(tiny_dir: Path, target: Path, state: dict[str, torch.Tensor]) -> Path:
    target.mkdir()
    for name in ("med_config.json", "vocab.txt"):
        (target / name).write_text((tiny_dir / name).read_text())
    torch.save(state, target / "ImageReward.pt")
    return target


def reference_reward(state: dict[str, torch.Tensor], med: dict, pixel_values: torch.Tensor,
                     input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """ImageReward's raw reward computed straight from the ORIGINAL key names with the original modules' math."""
    def lin(x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, state[f"{name}.weight"], state[f"{name}.bias"])

    def norm(x: torch.Tensor, name: str, eps: float) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], state[f"{name}.weight"], state[f"{name}.bias"], eps)

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None):
        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)
        scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(q.shape[-1] // heads)
        if mask is not None:  # med.py's extended mask
            scores = scores + (1.0 - mask[:, None, None, :].float()) * -10000.0
        return (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(q.shape)

    vit = "blip.visual_encoder"
    x = F.conv2d(pixel_values, state[f"{vit}.patch_embed.proj.weight"], state[f"{vit}.patch_embed.proj.bias"],
                 stride=state[f"{vit}.patch_embed.proj.weight"].shape[-1]).flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{vit}.cls_token"].expand(len(x), -1, -1), x], dim=1) + state[f"{vit}.pos_embed"]
    depth = 1 + max(int(k.split(".")[3]) for k in state if k.startswith(f"{vit}.blocks."))
    for i in range(depth):  # timm Block: pre-norm attention with a fused qkv, then a GELU MLP
        block = f"{vit}.blocks.{i}"
        q, k, v = lin(norm(x, f"{block}.norm1", 1e-6), f"{block}.attn.qkv").chunk(3, dim=-1)
        x = x + lin(attend(q, k, v, x.shape[-1] // 64), f"{block}.attn.proj")
        x = x + lin(F.gelu(lin(norm(x, f"{block}.norm2", 1e-6), f"{block}.mlp.fc1")), f"{block}.mlp.fc2")
    image = norm(x, f"{vit}.norm", 1e-6)

    bert, eps, heads = "blip.text_encoder", med["layer_norm_eps"], med["num_attention_heads"]
    y = (state[f"{bert}.embeddings.word_embeddings.weight"][input_ids]
         + state[f"{bert}.embeddings.position_embeddings.weight"][: input_ids.shape[1]])
    y = norm(y, f"{bert}.embeddings.LayerNorm", eps)
    for i in range(med["num_hidden_layers"]):  # med.py BertLayer in "multimodal" mode: self, cross, feed-forward
        layer = f"{bert}.encoder.layer.{i}"
        for part, source, mask in (("attention", y, attention_mask), ("crossattention", image, None)):
            source = y if part == "attention" else source
            a = attend(lin(y, f"{layer}.{part}.self.query"), lin(source, f"{layer}.{part}.self.key"),
                       lin(source, f"{layer}.{part}.self.value"), heads, mask)
            y = norm(lin(a, f"{layer}.{part}.output.dense") + y, f"{layer}.{part}.output.LayerNorm", eps)
        hidden = F.gelu(lin(y, f"{layer}.intermediate.dense"))
        y = norm(lin(hidden, f"{layer}.output.dense") + y, f"{layer}.output.LayerNorm", eps)
    reward = y[:, 0]
    for index in (0, 2, 4, 6, 7):
        reward = lin(reward, f"mlp.layers.{index}")
    return reward.squeeze(-1)


def test_tiny_writer_is_idempotent_and_seeded(tiny_dir: Path, tmp_path: Path) -> None:
    stamp = (tiny_dir / "ImageReward.pt").stat().st_mtime_ns
    assert write_tiny_imagereward(tiny_dir.parent) == tiny_dir
    assert (tiny_dir / "ImageReward.pt").stat().st_mtime_ns == stamp
    other = state_dict(write_tiny_imagereward(tmp_path))
    assert all(torch.equal(t, other[k]) for k, t in state_dict(tiny_dir).items())


def test_imagereward_load_consumes_every_key_and_fills_every_parameter(tiny_dir: Path, scorer: RewardScorer) -> None:
    keys = set(state_dict(tiny_dir))
    report = scorer.report
    skipped = {key for key, _ in report.skipped}
    assert set(report.loaded) | skipped == keys and not set(report.loaded) & skipped
    assert skipped == {"blip.vision_proj.weight", "blip.vision_proj.bias", "blip.text_proj.weight",
                       "blip.text_proj.bias", "blip.text_encoder.embeddings.position_ids"}
    assert set(report.filled) == set(scorer.model.state_dict())
    assert report.copied_heads == scorer.untrained_aspects == ASPECTS[1:]
    overall = scorer.model.heads["overall"].state_dict()
    for aspect in ASPECTS[1:]:
        assert all(torch.equal(t, overall[name]) for name, t in scorer.model.heads[aspect].state_dict().items())


def test_mapped_model_computes_what_the_original_blip_modules_compute(tiny_dir: Path, scorer: RewardScorer,
                                                                      images: list[Image.Image]) -> None:
    inputs = scorer.inputs(PROMPTS, images)
    med = json.loads((tiny_dir / "med_config.json").read_text())
    with torch.inference_mode():
        ours = scorer.model(**inputs)["overall"]
        reference = reference_reward(state_dict(tiny_dir), med, **inputs)
    assert reference.std() > 1e-3  # the tiny weights are large enough for every input to matter
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


STRAYS = ["blip.visual_encoder.blocks.0.attn.extra.weight", "blip.text_encoder.pooler.dense.weight",
          "blip.itm_head.weight", "mlp.layers.1.weight"]


@pytest.mark.parametrize("stray", STRAYS)
def test_a_stray_key_is_an_error_naming_it(tiny_dir: Path, tmp_path: Path, stray: str) -> None:
    state = state_dict(tiny_dir)
    state[stray] = torch.zeros(2)
    with pytest.raises(CheckpointMismatch, match=stray.replace(".", r"\.")) as error:
        load_imagereward(copy_checkpoint(tiny_dir, tmp_path / "ckpt", state))
    assert error.value.unexpected == (stray,)


@pytest.mark.parametrize(("removed", "parameter"), [
    ("blip.visual_encoder.blocks.1.norm2.weight", "vision_model.encoder.layers.1.layer_norm2.weight"),
    ("blip.text_encoder.encoder.layer.0.crossattention.self.key.bias",
     "text_model.encoder.layer.0.crossattention.self.key.bias"),
    ("mlp.layers.7.bias", "heads.overall.layers.7.bias"),
])
def test_a_missing_key_is_an_error_naming_the_unfilled_parameter(tiny_dir: Path, tmp_path: Path, removed: str,
                                                                 parameter: str) -> None:
    state = state_dict(tiny_dir)
    del state[removed]
    with pytest.raises(CheckpointMismatch, match="no checkpoint key fills") as error:
        load_imagereward(copy_checkpoint(tiny_dir, tmp_path / "ckpt", state))
    assert parameter in error.value.missing


def test_wrong_shapes_and_odd_position_ids_are_errors(tiny_dir: Path, tmp_path: Path) -> None:
    state = state_dict(tiny_dir)
    state["blip.text_encoder.encoder.layer.1.output.dense.bias"] = torch.zeros(7)
    with pytest.raises(CheckpointMismatch, match="shape") as error:
        load_imagereward(copy_checkpoint(tiny_dir, tmp_path / "shape", state))
    assert error.value.wrong_shape and "layer.1.output.dense.bias" in error.value.wrong_shape[0]
    state = state_dict(tiny_dir)
    state["blip.text_encoder.embeddings.position_ids"] = state["blip.text_encoder.embeddings.position_ids"].flip(-1)
    with pytest.raises(CheckpointMismatch, match="position_ids"):
        load_imagereward(copy_checkpoint(tiny_dir, tmp_path / "positions", state))


def test_vocab_that_does_not_fit_the_checkpoint_is_an_error(tiny_dir: Path, tmp_path: Path) -> None:
    target = copy_checkpoint(tiny_dir, tmp_path / "ckpt", state_dict(tiny_dir))
    (target / "vocab.txt").write_text((tiny_dir / "vocab.txt").read_text() + "extra\n")
    with pytest.raises(RewardError, match="vocab_size"):
        load_imagereward(target)


@pytest.mark.parametrize(("change", "message"), [
    ({"add_cross_attention": False}, "without cross-attention"),
    ({"position_embedding_type": "relative_key"}, "absolute position embeddings"),
    ({"hidden_act": None}, "lacks the BERT config fields hidden_act"),
])
def test_med_configs_that_are_not_imagerewards_are_errors(tiny_dir: Path, tmp_path: Path, change: dict,
                                                          message: str) -> None:
    target = copy_checkpoint(tiny_dir, tmp_path / "ckpt", state_dict(tiny_dir))
    med = json.loads((target / "med_config.json").read_text()) | change
    (target / "med_config.json").write_text(json.dumps({k: v for k, v in med.items() if v is not None}))
    with pytest.raises(RewardError, match=message):
        load_imagereward(target)


def test_missing_files_and_wrapped_state_dicts_are_errors(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(RewardError, match="no ImageReward checkpoint"):
        load_imagereward(tmp_path)
    target = copy_checkpoint(tiny_dir, tmp_path / "ckpt", state_dict(tiny_dir))
    with pytest.raises(RewardError, match="no med_config.json"):
        load_imagereward(target / "ImageReward.pt", med_config=tmp_path / "absent.json")
    with pytest.raises(RewardError, match="no BERT vocab"):
        load_imagereward(target, tokenizer=tmp_path)
    torch.save({"model": state_dict(tiny_dir)}, target / "ImageReward.pt")
    with pytest.raises(RewardError, match="plain state dict"):
        load_imagereward(target)


def test_a_bert_base_style_vocab_gets_dec_and_enc_appended_as_blip_does(tiny_dir: Path, tmp_path: Path,
                                                                       scorer: RewardScorer,
                                                                       images: list[Image.Image]) -> None:
    # bert-base-uncased's vocab.txt lacks [DEC] and [ENC]; BLIP adds them as ids 30522 and 30523 (the last two).
    target = copy_checkpoint(tiny_dir, tmp_path / "ckpt", state_dict(tiny_dir))
    words = (tiny_dir / "vocab.txt").read_text().split("\n")
    assert words[-3:] == ["[DEC]", "[ENC]", ""]
    (target / "vocab.txt").write_text("\n".join(words[:-3]) + "\n")
    loaded = load_imagereward(target)
    size = loaded.model.config.text["vocab_size"]
    assert loaded.tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [size - 2, size - 1]
    assert loaded.model.config.text["bos_token_id"] == size - 2
    rescored = RewardScorer(loaded).score(PROMPTS, images)
    assert np.array_equal(rescored["overall"], scorer.score(PROMPTS, images)["overall"])


def test_vit_l_sizes_are_read_off_imagereward_shaped_tensors() -> None:
    meta = {"vision_model.embeddings.class_embedding": (1, 1, 1024),
            "vision_model.embeddings.position_embedding": (1, 197, 1024),
            "vision_model.embeddings.patch_embedding.weight": (1024, 3, 16, 16),
            **{f"vision_model.encoder.layers.{i}.mlp.fc1.weight": (4096, 1024) for i in range(24)}}
    vision = vision_from_tensors({k: torch.empty(shape, device="meta") for k, shape in meta.items()}, "ViT-L")
    assert vision == {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24,
                      "num_attention_heads": 16, "image_size": 224, "patch_size": 16, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-6}
    odd = {**meta, "vision_model.embeddings.position_embedding": (1, 198, 1024)}
    with pytest.raises(CheckpointMismatch, match="not a square-grid BLIP ViT"):
        vision_from_tensors({k: torch.empty(shape, device="meta") for k, shape in odd.items()}, "odd")
    del meta["vision_model.embeddings.class_embedding"]
    with pytest.raises(CheckpointMismatch, match="cannot be read off") as error:
        vision_from_tensors({k: torch.empty(shape, device="meta") for k, shape in meta.items()}, "headless")
    assert error.value.missing == ("vision_model.embeddings.class_embedding",)


def test_preprocessing_is_imagerewards_transform_bit_for_bit(scorer: RewardScorer, images: list[Image.Image]) -> None:
    size = scorer.config.image_size
    transform = Compose([Resize(size, interpolation=InterpolationMode.BICUBIC), CenterCrop(size),
                         lambda image: image.convert("RGB"), ToTensor(),
                         Normalize((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))])
    expected = torch.stack([transform(image) for image in images])
    assert torch.equal(scorer.inputs(PROMPTS, images)["pixel_values"], expected)


def test_prompts_are_padded_to_35_truncated_and_keep_the_leading_cls(scorer: RewardScorer) -> None:
    long_prompt = " ".join(["red cat"] * 40)
    ids, mask = scorer.text_inputs(["a red cat", long_prompt])
    tokenizer = scorer.tokenizer
    assert ids.shape == mask.shape == (2, 35)
    assert (ids[:, 0] == tokenizer.cls_token_id).all()
    assert ids[0, :5].tolist() == tokenizer.convert_tokens_to_ids(["[CLS]", "a", "red", "cat", "[SEP]"])
    assert mask[0].tolist() == [1] * 5 + [0] * 30 and (ids[0, 5:] == tokenizer.pad_token_id).all()
    assert mask[1].all() and ids[1, -1] == tokenizer.sep_token_id


def test_scores_are_deterministic_standardized_raw_head_outputs(scorer: RewardScorer,
                                                                images: list[Image.Image]) -> None:
    scores = scorer.score(PROMPTS, images)
    assert all(np.array_equal(scores[a], again) for a, again in scorer.score(PROMPTS, images).items())
    with torch.inference_mode():
        raw = scorer.model(**scorer.inputs(PROMPTS, images))
    for aspect in ASPECTS:
        expected = (raw[aspect].numpy() - IMAGEREWARD_MEAN) / IMAGEREWARD_STD
        np.testing.assert_allclose(scores[aspect], expected, rtol=1e-6, atol=1e-6)
        assert scores[aspect].dtype == np.float32 and scores[aspect].shape == (len(images),)
    assert np.ptp(scores["overall"]) > 0


def test_batching_gives_the_scores_of_one_by_one(scorer: RewardScorer, images: list[Image.Image]) -> None:
    together = scorer.score(PROMPTS, images, batch_size=len(images))
    for size in (1, 2):
        batched = scorer.score(PROMPTS, images, batch_size=size)
        for aspect in ASPECTS:
            np.testing.assert_allclose(batched[aspect], together[aspect], rtol=1e-5, atol=1e-5)
    empty = scorer.score([], [])
    assert set(empty) == set(ASPECTS) and all(v.shape == (0,) for v in empty.values())


def test_all_five_aspects_are_scored(scorer: RewardScorer, images: list[Image.Image]) -> None:
    assert scorer.aspects == ("overall", *TASK_ASPECTS["generation"]) == ASPECTS
    assert tuple(scorer.score(PROMPTS[:2], images[:2])) == ASPECTS


def test_own_format_round_trip_gives_identical_scores(scorer: RewardScorer, images: list[Image.Image],
                                                      tmp_path: Path) -> None:
    # Distinct heads, as training leaves them, so a head saved under the wrong aspect would show.
    with torch.no_grad():
        for i, aspect in enumerate(ASPECTS):
            scorer.model.heads[aspect].layers[-1].bias.add_(i)
    try:
        before = scorer.score(PROMPTS, images)
        save_vpscore(tmp_path / "vp", scorer.model, scorer.tokenizer)
        loaded = load_vpscore(tmp_path / "vp")
    finally:
        with torch.no_grad():
            for i, aspect in enumerate(ASPECTS):
                scorer.model.heads[aspect].layers[-1].bias.sub_(i)
    assert loaded.model.config == scorer.config
    assert set(loaded.report.filled) == set(loaded.model.state_dict())
    after = RewardScorer(loaded).score(PROMPTS, images)
    assert all(np.array_equal(before[aspect], after[aspect]) for aspect in ASPECTS)
    assert len({float(after[aspect][0]) for aspect in ASPECTS}) == len(ASPECTS)


def test_own_format_is_strict_too(scorer: RewardScorer, tmp_path: Path) -> None:
    directory = save_vpscore(tmp_path / "vp", scorer.model, scorer.tokenizer)
    tensors = load_file(directory / "model.safetensors")
    tensors["heads.novelty.layers.0.weight"] = torch.zeros(1)
    del tensors["heads.fidelity.layers.7.bias"]
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointMismatch) as error:
        load_vpscore(directory)
    assert error.value.unexpected == ("heads.novelty.layers.0.weight",)
    assert error.value.missing == ("heads.fidelity.layers.7.bias",)
    config = json.loads((directory / "config.json").read_text())
    config["text"]["vocab_size"] += 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(RewardError, match="tokenizer .* has"):
        load_vpscore(directory)
    (directory / "config.json").write_text(json.dumps({"model_type": "blip"}))
    with pytest.raises(RewardError, match="not a VP-Score config"):
        load_vpscore(directory)
    (directory / "model.safetensors").unlink()
    with pytest.raises(RewardError, match="not a VP-Score directory"):
        load_vpscore(directory)


@pytest.mark.parametrize(("change", "message"), [
    ({"aspects": ("overall", "overall")}, "distinct"),
    ({"aspects": ("overall", "novelty")}, "standardization must give"),
    ({"standardization": {a: (0.0, 0.0) for a in ASPECTS}}, "positive std"),
    ({"untrained_aspects": ("novelty",)}, "not among"),
    ({"head_dropout": (0.1,) * 5}, "at most one dropout"),
    ({"max_length": 1000}, "max_length"),
])
def test_inconsistent_configs_are_refused(scorer: RewardScorer, change: dict, message: str) -> None:
    with pytest.raises(RewardError, match=message):
        replace(scorer.config, **change)
    with pytest.raises(RewardError, match="encoder_hidden_size must equal the vision width"):
        replace(scorer.config, text={**scorer.config.text, "encoder_hidden_size": 7})
    with pytest.raises(RewardError, match="unknown VP-Score config fields: colour"):
        VPScoreConfig.from_dict({**scorer.config.to_dict(), "colour": "red"})


def test_registry_constructor_builds_the_tiny_scorer_and_resolves_paths_under_home(tmp_path: Path,
                                                                                   images: list[Image.Image]) -> None:
    tiny = VPScore({"checkpoint": "tiny", "format": "imagereward", "batch_size": 2}, device="cpu",
                   dtype="float32", home=tmp_path)
    assert (tmp_path / "tiny" / "imagereward" / "ImageReward.pt").is_file() and tiny.name == "VP-Score"
    save_vpscore(tmp_path / "trained" / "vp-1", tiny.model, tiny.tokenizer)
    trained = VPScore({"checkpoint": "trained/vp-1", "format": "vpscore", "name": "VP-Score v1"}, device="cpu",
                      dtype="float32", home=tmp_path)
    assert trained.name == "VP-Score v1"
    np.testing.assert_array_equal(trained.score(PROMPTS[:3], images[:3], batch_size=2)["overall"],
                                  tiny.score(PROMPTS[:3], images[:3])["overall"])
    half = VPScore({"checkpoint": "tiny", "format": "imagereward"}, device="cpu", dtype="bfloat16", home=tmp_path)
    assert half.model.vision_model.dtype == torch.bfloat16 and half.model.heads["overall"].layers[0].weight.dtype \
        == torch.float32
    assert np.isfinite(half.score(PROMPTS[:2], images[:2])["overall"]).all()


@pytest.mark.parametrize(("settings", "message"), [
    ({"checkpoint": "tiny"}, "format"),
    ({"checkpoint": "tiny", "format": "vpscore"}, "ImageReward format"),
    ({"checkpoint": "tiny", "format": "imagereward", "colour": "red"}, "unknown VP-Score settings: colour"),
    ({"checkpoint": "x", "format": "safetensors"}, "format must be one of"),
    ({"checkpoint": "x", "format": "vpscore", "med_config": "m.json"}, "ImageReward-format settings"),
    ({"checkpoint": "tiny", "format": "imagereward", "batch_size": 0}, "batch_size"),
    ({"checkpoint": " ", "format": "imagereward"}, "checkpoint must be"),
    ({"checkpoint": "tiny", "format": "imagereward", "name": ""}, "name must be"),
])
def test_bad_settings_are_refused_clearly(tmp_path: Path, settings: dict, message: str) -> None:
    with pytest.raises(InvalidSettings, match=message):
        VPScore(settings, device="cpu", dtype="float32", home=tmp_path)


def test_an_unknown_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidSettings, match="dtype must be one of"):
        VPScore({"checkpoint": "tiny", "format": "imagereward"}, device="cpu", dtype="float64", home=tmp_path)


def test_bad_score_calls_are_refused(scorer: RewardScorer, images: list[Image.Image]) -> None:
    with pytest.raises(RewardError, match="one prompt per image"):
        scorer.score(PROMPTS[:2], images[:3])
    with pytest.raises(RewardError, match="list of strings"):
        scorer.score("a cat", images[:1])  # type: ignore[arg-type]
    with pytest.raises(RewardError, match="not PIL images"):
        scorer.score(["a cat"], [np.zeros((4, 4, 3))])  # type: ignore[list-item]
    with pytest.raises(RewardError, match="not strings"):
        scorer.score([None], images[:1])  # type: ignore[list-item]
    with pytest.raises(RewardError, match="batch_size"):
        scorer.score(PROMPTS[:1], images[:1], batch_size=0)
