"""ArtGPT-4-style adapters on the tiny converted LLaVA: identity at init, placement, switch, round trip."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from engines.adapters import AdapterError, ImageAdapters, artgpt4_trainable, decoder_layers
from engines.llava_convert import load_or_convert
from engines.tiny import write_tiny_llava_original


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory):
    root = write_tiny_llava_original(tmp_path_factory.mktemp("tiny"))
    model, _, _ = load_or_convert(root / "llava", root / "converted", root / "clip-vision")
    return model


IDS = torch.tensor([[1, 5, 9, 12, 7, 3]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _randomize(adapters: ImageAdapters) -> None:
    torch.manual_seed(0)
    for adapter in adapters.adapters:
        torch.nn.init.normal_(adapter.up.weight, std=0.5)


def test_zero_initialized_adapters_change_nothing(model) -> None:
    before = _logits(model)
    adapters = ImageAdapters.for_model(model).attach(model)
    try:
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
        _randomize(adapters)
        changed = _logits(model)
        assert not torch.allclose(changed, before)
        with adapters.disabled():
            torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
        torch.testing.assert_close(_logits(model), changed)
        adapters.enabled = False
        torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)
    finally:
        adapters.detach()
    torch.testing.assert_close(_logits(model), before, rtol=0, atol=0)


def test_adapter_acts_on_the_residual_stream_before_the_mlp_norm(model) -> None:
    layer = decoder_layers(model)[0]
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        seen.setdefault(name, value)

    hooks = [layer.register_forward_pre_hook(lambda m, a, k: keep("x", k.get("hidden_states", a[0] if a else None)),
                                             with_kwargs=True),
             layer.self_attn.register_forward_hook(lambda m, a, out: keep("a", out[0])),
             layer.post_attention_layernorm.register_forward_pre_hook(lambda m, a: keep("h", a[0]))]
    # Attached after the probes, so the self_attn probe sees the attention output before the adapter.
    adapters = ImageAdapters.for_model(model).attach(model)
    _randomize(adapters)
    try:
        _logits(model)
    finally:
        for hook in hooks:
            hook.remove()
        adapters.detach()
    stream = seen["x"] + seen["a"]  # the self-attention residual
    with torch.no_grad():
        torch.testing.assert_close(seen["h"], stream + adapters.adapters[0](stream))


def test_save_and_load_round_trip(model, tmp_path: Path) -> None:
    adapters = ImageAdapters.for_model(model)
    _randomize(adapters)
    path = adapters.save(tmp_path / "adapters.safetensors")
    adapters.attach(model)
    expected = _logits(model)
    adapters.detach()
    loaded = ImageAdapters.for_model(model).load(path).attach(model)
    try:
        torch.testing.assert_close(_logits(model), expected)
    finally:
        loaded.detach()
    with pytest.raises(AdapterError, match="does not fit"):
        ImageAdapters(64, 2).load(path)
    with pytest.raises(AdapterError, match="decoder layers"):
        ImageAdapters(32, 5).attach(model)


def test_artgpt4_trains_adapters_norms_and_projector_only(model) -> None:
    adapters = ImageAdapters.for_model(model)
    try:
        names = artgpt4_trainable(model, adapters)
        layers = len(decoder_layers(model))
        assert sorted(names) == sorted(
            [f"model.language_model.layers.{i}.post_attention_layernorm.weight" for i in range(layers)]
            + [f"model.language_model.layers.{i}.input_layernorm.weight" for i in range(0, layers, 2)]
            + [f"model.multi_modal_projector.linear_{j}.{p}" for j in (1, 2) for p in ("weight", "bias")])
        assert all(p.requires_grad for p in adapters.parameters())
    finally:
        model.requires_grad_(True)
