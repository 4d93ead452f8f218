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

from engines.llava_convert import ConversionError, convert_original_llava, load_or_convert
from engines.tiny import write_tiny_llava_original


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llava_original(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def converted(original: Path):
    return convert_original_llava(original / "llava", original / "clip-vision")


def _copy(original: Path, tmp_path: Path) -> Path:
    target = tmp_path / "llava"
    shutil.copytree(original / "llava", target)
    return target


def test_every_key_consumed_and_every_parameter_filled(original: Path, converted) -> None:
    model, _, report = converted
    state = load_file(original / "llava" / "model.safetensors")
    assert report.mapped == len(state) and report.added_tokens == ("<image>",)
    params = model.state_dict()
    torch.testing.assert_close(params["model.multi_modal_projector.linear_1.weight"],
                               state["model.mm_projector.0.weight"])
    torch.testing.assert_close(params["model.multi_modal_projector.linear_2.bias"], state["model.mm_projector.2.bias"])
    vision = CLIPVisionModel.from_pretrained(original / "clip-vision").state_dict()
    assert report.vision_keys == len(vision)
    for key, value in vision.items():
        torch.testing.assert_close(params["model.vision_tower." + key.removeprefix("vision_model.")], value)


def test_text_logits_equal_llama_loaded_straight(original: Path, converted) -> None:
    model, processor, _ = converted
    raw = json.loads((original / "llava" / "config.json").read_text())
    llama = LlamaForCausalLM(LlamaConfig(**{k: raw[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                                 "num_hidden_layers", "num_attention_heads",
                                                                 "num_key_value_heads", "max_position_embeddings")}))
    state = {k: v for k, v in load_file(original / "llava" / "model.safetensors").items() if "mm_projector" not in k}
    llama.load_state_dict(state, strict=True)
    ids = processor.tokenizer("how would you rate the aesthetics of this image ?", return_tensors="pt").input_ids
    with torch.no_grad():
        ours = model(input_ids=ids).logits[..., :raw["vocab_size"]]
        reference = llama.eval()(input_ids=ids).logits
    torch.testing.assert_close(ours, reference)


def test_image_features_are_llava_patch_features_through_the_projector(original: Path, converted) -> None:
    model, processor, _ = converted
    pixels = processor.image_processor(Image.new("RGB", (50, 40), (30, 160, 90)), return_tensors="pt").pixel_values
    state = load_file(original / "llava" / "model.safetensors")
    tower = CLIPVisionModel.from_pretrained(original / "clip-vision").eval()
    with torch.no_grad():
        patches = tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # select layer -2, no CLS
        hidden = torch.nn.functional.gelu(patches @ state["model.mm_projector.0.weight"].T
                                          + state["model.mm_projector.0.bias"])
        expected = hidden @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
        # One projected feature row per patch and image, as the LM receives them in place of <image> tokens.
        [ours] = model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(ours, expected[0])


def test_llava_v1_conversation(converted) -> None:
    _, processor, _ = converted
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Rate it."}]},
                {"role": "assistant", "content": [{"type": "text", "text": "Good."}]},
                {"role": "user", "content": [{"type": "text", "text": "Why?"}]}]
    assert processor.apply_chat_template(messages, add_generation_prompt=True) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions. USER: <image>\nRate it. ASSISTANT: Good.</s>"
        "USER: Why? ASSISTANT:")


def test_unknown_projector_is_refused(original: Path, tmp_path: Path) -> None:
    target = _copy(original, tmp_path)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "mm_projector_type": "qformer"}))
    with pytest.raises(ConversionError, match="unknown mm_projector_type 'qformer'"):
        convert_original_llava(target, original / "clip-vision")


@pytest.mark.parametrize("change, message", [("stray", "map nowhere: model.mm_projector.4.weight"),
                                             ("missing", "unfilled: model.language_model.norm.weight")])
def test_stray_and_missing_keys_are_errors(original: Path, tmp_path: Path, change: str, message: str) -> None:
    target = _copy(original, tmp_path)
    state = load_file(target / "model.safetensors")
    if change == "stray":
        state["model.mm_projector.4.weight"] = torch.zeros(2, 2)
    else:
        del state["model.norm.weight"]
    save_file(state, target / "model.safetensors")
    with pytest.raises(ConversionError, match=message):
        convert_original_llava(target, original / "clip-vision")


def test_converted_model_is_cached(original: Path, converted, tmp_path: Path) -> None:
    source = _copy(original, tmp_path)
    model, _, aspect = load_or_convert(source, tmp_path / "cache", original / "clip-vision")
    shutil.rmtree(source)  # a second start must not need the original any more
    again, processor, aspect_again = load_or_convert(source, tmp_path / "cache", original / "clip-vision")
    ids = processor.tokenizer("rate the image", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, again(input_ids=ids).logits)
        torch.testing.assert_close(again(input_ids=ids).logits, converted[0](input_ids=ids).logits)
    assert aspect == aspect_again == "pad"
