"""Original-format LLaVA-1.5 (AesExpert's layout) converted to transformers, checked against independent loads."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPVisionModel, LlamaConfig, LlamaForCausalLM

from engines.llava_convert import ConversionError, convert_original_llava, load_converted, load_or_convert
from engines.tiny import write_tiny_llava_original

LLAMA_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings")


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava_original(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def converted(original: Path, tmp_path_factory: pytest.TempPathFactory):
    return load_or_convert(original / "llava", tmp_path_factory.mktemp("cache") / "llava", original / "clip-vision")


def _copy(original: Path, tmp_path: Path) -> Path:
    target = tmp_path / "llava"
    shutil.copytree(original / "llava", target)
    return target


def _reference_llama(original: Path) -> LlamaForCausalLM:
    """The Llama body of the original checkpoint loaded straight into transformers' Llama, strictly."""
    raw = json.loads((original / "llava" / "config.json").read_text())
    llama = LlamaForCausalLM(LlamaConfig(**{k: raw[k] for k in LLAMA_KEYS}))
    state = {k: v for k, v in load_file(original / "llava" / "model.safetensors").items() if "mm_projector" not in k}
    llama.load_state_dict(state, strict=True)
    return llama.eval()


def test_every_key_consumed_and_every_parameter_filled(original: Path, converted) -> None:
    model, _, report = converted
    state = load_file(original / "llava" / "model.safetensors")
    vision = CLIPVisionModel.from_pretrained(original / "clip-vision").state_dict()
    assert (report.mapped, report.derived, report.vision_keys, report.vision_from_checkpoint) == (
        len(state), 0, len(vision), 0)
    assert report.added_tokens == ("<image>",) and report.image_aspect_ratio == "pad"
    params = model.state_dict()
    assert len(params) == len(state) + len(vision)
    torch.testing.assert_close(params["model.multi_modal_projector.linear_1.weight"],
                               state["model.mm_projector.0.weight"])
    torch.testing.assert_close(params["model.multi_modal_projector.linear_2.bias"], state["model.mm_projector.2.bias"])
    torch.testing.assert_close(params["model.language_model.layers.1.mlp.down_proj.weight"],
                               state["model.layers.1.mlp.down_proj.weight"])
    for key, value in vision.items():
        torch.testing.assert_close(params["model.vision_tower." + key.removeprefix("vision_model.")], value)


def test_text_logits_equal_llama_loaded_straight(original: Path, converted) -> None:
    model, processor, _ = converted
    llama = _reference_llama(original)
    ids = processor.tokenizer("how would you rate the aesthetics of this image ?", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., :llama.config.vocab_size]
        torch.testing.assert_close(ours, llama(input_ids=ids).logits)


def test_image_logits_equal_an_independent_llava_forward(original: Path, converted) -> None:
    model, processor, _ = converted
    llama = _reference_llama(original)
    tower = CLIPVisionModel.from_pretrained(original / "clip-vision").eval()
    state = load_file(original / "llava" / "model.safetensors")
    inputs = processor(images=Image.new("RGB", (50, 40), (30, 160, 90)),
                       text="USER: <image>\nhow would you rate this image ? ASSISTANT:", return_tensors="pt")
    ids = inputs.input_ids[0]
    image_positions = (ids == model.config.image_token_id).nonzero().flatten()
    with torch.no_grad():
        # LLaVA-1.5: layer -2 of the tower, CLS dropped, the mlp2x_gelu projector, spliced where <image> stood.
        patches = tower(inputs.pixel_values, output_hidden_states=True).hidden_states[-2][0, 1:]
        hidden = torch.nn.functional.gelu(patches @ state["model.mm_projector.0.weight"].T
                                          + state["model.mm_projector.0.bias"])
        features = hidden @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
        assert len(image_positions) == len(features)
        first, last = int(image_positions[0]), int(image_positions[-1]) + 1
        embed = llama.get_input_embeddings()
        spliced = torch.cat([embed(ids[:first]), features, embed(ids[last:])])[None]
        reference = llama(inputs_embeds=spliced).logits
        ours = model(**inputs).logits[..., :llama.config.vocab_size]
    torch.testing.assert_close(ours, reference)


def test_llava_v1_conversation(converted) -> None:
    _, processor, _ = converted
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Good."}]},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nRate it. ASSISTANT: Good.</s>"
        "USER: Why? ASSISTANT:")


@pytest.mark.parametrize("field, value, message", [
    ("mm_projector_type", "qformer", "unknown mm_projector_type 'qformer'; supported: mlp2x_gelu"),
    ("image_aspect_ratio", "anyres", "unknown image_aspect_ratio 'anyres'"),
    ("mm_vision_select_feature", "cls", "unknown mm_vision_select_feature 'cls'"),
    ("mm_use_im_start_end", True, "mm_use_im_start_end is set"),
])
def test_unsupported_configs_are_refused(original: Path, tmp_path: Path, field: str, value, message: str) -> None:
    target = _copy(original, tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ConversionError, match=message):
        convert_original_llava(target, tmp_path / "out", original / "clip-vision")


@pytest.mark.parametrize("change, message", [
    ("stray", "map nowhere: model.mm_projector.4.weight"),
    ("missing", "unfilled: model.language_model.norm.weight"),
    ("shape", r"wrong shapes: model.multi_modal_projector.linear_2.bias \(7,\)"),
])
def test_stray_missing_and_misshapen_keys_are_errors(original: Path, tmp_path: Path, change: str,
                                                     message: str) -> None:
    target = _copy(original, tmp_path)
    state = load_file(target / "model.safetensors")
    if change == "stray":
        state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    elif change == "missing":
        del state["model.norm.weight"]
    else:
        state["model.mm_projector.2.bias"] = torch.zeros(7)
    save_file(state, target / "model.safetensors")
    with pytest.raises(ConversionError, match=message):
        convert_original_llava(target, tmp_path / "out", original / "clip-vision")


def test_bin_shards_with_rotary_buffers_and_a_trained_tower(original: Path, tmp_path: Path) -> None:
    """Older LLaVA saves: pytorch_model-*.bin shards, inv_freq buffers, and a tower trained inside the checkpoint."""
    target = _copy(original, tmp_path)
    state = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    # transformers 5 names the tower's parameters without the "vision_model." of older versions and Hub files.
    tower = {k.removeprefix("vision_model."): v
             for k, v in CLIPVisionModel.from_pretrained(original / "clip-vision").state_dict().items()}
    tuned = tower["post_layernorm.bias"]
    state["model.vision_tower.vision_tower.vision_model.post_layernorm.bias"] = tuned + 1
    names = sorted(state)
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:]), start=1):
        torch.save({k: state[k] for k in part}, target / f"pytorch_model-0000{i}-of-00002.bin")
    report = convert_original_llava(target, tmp_path / "out", original / "clip-vision")
    assert (report.derived, report.vision_from_checkpoint, report.mapped) == (1, 1, len(state) - 1)
    model, _, _ = load_converted(tmp_path / "out")
    torch.testing.assert_close(model.state_dict()["model.vision_tower.post_layernorm.bias"], tuned + 1)


def test_converted_model_is_cached(original: Path, converted, tmp_path: Path) -> None:
    source = _copy(original, tmp_path)
    model, _, report = load_or_convert(source, tmp_path / "cache", original / "clip-vision")
    shutil.rmtree(source)  # a second start must not need the original any more
    again, processor, report_again = load_or_convert(source, tmp_path / "cache", original / "clip-vision",
                                                     dtype=torch.float32)
    ids = processor.tokenizer("rate the image", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)
        torch.testing.assert_close(again(input_ids=ids).logits, converted[0](input_ids=ids).logits)
    assert report == report_again and report.image_aspect_ratio == "pad"


def test_a_damaged_cache_is_refused(original: Path, converted, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    load_or_convert(original / "llava", cache, original / "clip-vision")
    state = load_file(cache / "model.safetensors")
    del state["model.multi_modal_projector.linear_1.bias"]
    save_file(state, cache / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="does not load cleanly.*linear_1.bias"):
        load_converted(cache)
