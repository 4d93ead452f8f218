"""ArtGPT-4-style image adapters: `up(GELU(down(x))) + x` in every decoder layer of a critic's language model.

The adapter acts on the residual stream right after the self-attention residual, before
`post_attention_layernorm`. Hooks put it there without touching transformers' module tree: a pre-hook keeps
the layer's input x, and a hook on `self_attn` returns a + adapter_delta(x + a), so that the layer's own
`x + a` becomes h + adapter_delta(h) for h = x + a. Adapters are saved and loaded apart from the model.
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle


class AdapterError(ValueError):
    """Adapters that do not fit the model; the message names the mismatch."""


class BottleneckAdapter(nn.Module):
    """down h→h/4, GELU, up h/4→h, both with bias; `up` starts at zero so a new adapter changes nothing."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.down = nn.Linear(hidden, hidden // 4)
        self.up = nn.Linear(hidden // 4, hidden)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's change to the residual stream (the `+ x` is the layer's own residual)."""
        return self.up(nn.functional.gelu(self.down(x)))


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers of a causal LM or of a VLM's language model."""
    text = model.get_decoder() if hasattr(model, "get_decoder") else model
    text = getattr(text, "language_model", text)
    layers = getattr(text, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(layer, "self_attn") for layer in layers):
        raise AdapterError(f"{type(model).__name__} has no decoder layers with self_attn to adapt")
    return layers


class ImageAdapters(nn.Module):
    """One adapter per decoder layer, attached by hooks; `enabled` switches them off without detaching."""

    def __init__(self, hidden: int, layers: int) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(BottleneckAdapter(hidden) for _ in range(layers))
        self.enabled = True
        self._handles: list[RemovableHandle] = []

    @classmethod
    def for_model(cls, model: nn.Module) -> ImageAdapters:
        """Fresh (identity) adapters sized for `model`, on its device and dtype."""
        layers = decoder_layers(model)
        hidden = model.config.get_text_config().hidden_size
        first = next(layers[0].parameters())
        return cls(hidden, len(layers)).to(device=first.device, dtype=first.dtype)

    def attach(self, model: nn.Module) -> ImageAdapters:
        """Hook the adapters into `model`'s decoder layers (one per layer, in order)."""
        layers = decoder_layers(model)
        if len(layers) != len(self.adapters):
            raise AdapterError(f"{len(self.adapters)} adapters for a model with {len(layers)} decoder layers")
        self.detach()
        for layer, adapter in zip(layers, self.adapters):
            # Per thread: the critic generates in worker threads, and one forward must not see another's input.
            seen = threading.local()

            def keep_input(module: nn.Module, args: tuple, kwargs: dict, seen: threading.local = seen) -> None:
                seen.x = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

            def adapt(module: nn.Module, args: tuple, output: Any, seen: threading.local = seen,
                      adapter: BottleneckAdapter = adapter) -> Any:
                x = seen.__dict__.pop("x")  # popped even when disabled, so no activation outlives its forward
                if not self.enabled:
                    return output
                attended = output[0] if isinstance(output, tuple) else output
                changed = attended + adapter(x + attended)
                return (changed, *output[1:]) if isinstance(output, tuple) else changed

            self._handles += [layer.register_forward_pre_hook(keep_input, with_kwargs=True),
                              layer.self_attn.register_forward_hook(adapt)]
        return self

    def detach(self) -> None:
        """Remove the hooks; the model is back to its own forward."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextmanager
    def disabled(self) -> Iterator[None]:
        """The model without its adapters inside the block (a reference model for training or comparison)."""
        enabled, self.enabled = self.enabled, False
        try:
            yield
        finally:
            self.enabled = enabled

    def save(self, path: Path) -> Path:
        """The adapter weights alone, as safetensors."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, path)
        return path

    def load(self, path: Path) -> ImageAdapters:
        """Load weights saved by `save`; every name and shape must match."""
        state = load_file(Path(path))
        expected = self.state_dict()
        unexpected, missing = sorted(set(state) - set(expected)), sorted(set(expected) - set(state))
        wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
        if unexpected or missing or wrong:
            raise AdapterError(f"{path} does not fit these adapters: unexpected {unexpected[:10]}, missing "
                               f"{missing[:10]}, wrong shapes {wrong[:10]}")
        self.load_state_dict(state)
        return self


def artgpt4_trainable(model: nn.Module, adapters: ImageAdapters) -> list[str]:
    """Freeze all but ArtGPT-4's trainable set, and return the model's parameter names left trainable.

    ArtGPT-4 trains the adapters, every post_attention_layernorm, the input_layernorm of even layers, and the
    image projection into the LLM (its `llama_proj`; a Llava model's `multi_modal_projector`).
    """
    model.requires_grad_(False)
    adapters.requires_grad_(True)
    for index, layer in enumerate(decoder_layers(model)):
        layer.post_attention_layernorm.requires_grad_(True)
        if index % 2 == 0:
            layer.input_layernorm.requires_grad_(True)
    projector = getattr(getattr(model, "model", model), "multi_modal_projector", None)
    if projector is None:
        raise AdapterError(f"{type(model).__name__} has no multi_modal_projector, the image projection to train")
    projector.requires_grad_(True)
    return [name for name, parameter in model.named_parameters() if parameter.requires_grad]
