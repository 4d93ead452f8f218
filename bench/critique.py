"""Benchmark: the critic's streaming path against a bare `model.generate` on the same prepared inputs.

The engine path is what a chat request costs: chat template, processor, a worker thread, the cancel check and
the streamer's decoding, timed from the call to the first text shown and to the last. The bare path is
`model.generate` on inputs made beforehand, on the same thread, timed with a streamer that only notes when
tokens arrive. Both
decode greedily, with end-of-sequence switched off so they make the same number of tokens; the texts must agree.

Time to first token holds the fixed costs (prompt, image preprocessing, prefill); tokens/s is the decoding
rate after it, (new tokens - 1) / (last - first), as serving benchmarks count it. The whole answer's time is
reported beside them.

    python bench/critique.py                       # the tiny original-format LLaVA, through the converter
    python bench/critique.py --size 7b --device cuda --dtype float16   # random weights, LLaVA-1.5-7B sizes
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers
from PIL import Image
from transformers.generation.streamers import BaseStreamer

# Run as `python bench/critique.py`, the repository root is not on sys.path; add it so `engines` imports.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.machine import machine  # noqa: E402
from engines.critic import DTYPES, Critic, GenerationSettings  # noqa: E402
from engines.llava_convert import LLAVA_V1_TEMPLATE  # noqa: E402

QUESTION = "how would you rate the aesthetics of this image ? describe the composition and the light ."
# LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 patches) and Vicuna-7B (Llama-2 7B sizes, 32000 tokens + <image>).
VISION_7B = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 image_size=336, patch_size=14, projection_dim=768)
TEXT_7B = dict(vocab_size=32001, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
               bos_token_id=1, eos_token_id=2, pad_token_id=0)
TARGETS = {"max_tokens_per_s_loss": 0.05, "max_extra_ttft_ms": 50.0}


@dataclass(frozen=True)
class BenchConfig:
    """Model size, decoding length, repeats and placement of one run."""

    size: str = "tiny"
    new_tokens: int = 128  # a short critique; AesExpert's default answer allows 256
    repeats: int = 5
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 0


def write_random_7b(folder: Path, bench: BenchConfig) -> Path:
    """A random-weight LLaVA-1.5-7B in transformers format with a 32001-token word-level tokenizer (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

    words = sorted(set(QUESTION.split()))
    tokens = ["<unk>", "<s>", "</s>", *words]
    tokens += [f"w{i}" for i in range(TEXT_7B["vocab_size"] - 1 - len(tokens))] + ["<image>"]
    core = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                        pad_token="<unk>", additional_special_tokens=["<image>"])
    config = LlavaConfig(vision_config=CLIPVisionConfig(**VISION_7B), text_config=LlamaConfig(**TEXT_7B),
                         image_token_index=TEXT_7B["vocab_size"] - 1, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=576)
    torch.manual_seed(bench.seed)
    # Built on the device in the bench's dtype: 7B parameters in float32 on a CPU take minutes to initialize.
    default = torch.get_default_dtype()
    torch.set_default_dtype(DTYPES[bench.dtype])
    try:
        with torch.device(bench.device):
            model = LlavaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(folder)
    del model
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 336},
                                                      crop_size={"height": 336, "width": 336}),
                   tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default",
                   num_additional_image_tokens=1, chat_template=LLAVA_V1_TEMPLATE).save_pretrained(folder)
    return folder


class _Clock(BaseStreamer):
    """Notes when the first generated token and the end arrive; decodes nothing."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None
        self.last = 0.0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:  # the first put is the prompt
            self.first = time.perf_counter()

    def end(self) -> None:
        self.last = time.perf_counter()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run(bench: BenchConfig) -> dict[str, Any]:
    """Time both paths, alternating, and compare their medians."""
    with tempfile.TemporaryDirectory(prefix="cr_bench_") as folder:
        if bench.size == "7b":
            settings = {"model": str(write_random_7b(Path(folder) / "llava-7b", bench)), "format": "transformers"}
        else:
            settings = {"model": "tiny", "format": "llava-original"}
        critic = Critic(settings, device=bench.device, dtype=bench.dtype, home=Path(folder))
    # Both paths must make exactly new_tokens tokens, so the model may not stop early.
    critic.model.generation_config.eos_token_id = None
    generation = GenerationSettings(max_new_tokens=bench.new_tokens)
    image = Image.fromarray(np.random.default_rng(bench.seed).integers(0, 256, (480, 640, 3), dtype=np.uint8))
    inputs = critic.on_model_thread(critic.inputs, image, QUESTION, reserve=bench.new_tokens)
    prompt_tokens = int(inputs["input_ids"].shape[1])

    def engine() -> tuple[float, float, float, str]:
        _sync(bench.device)
        start = time.perf_counter()
        first, text = None, ""
        for text in critic.stream(image, QUESTION, generation=generation):
            if first is None and text:
                first = time.perf_counter()
        _sync(bench.device)
        last = time.perf_counter()
        return first - start, last - first, last - start, text

    def bare() -> tuple[float, float, float, str]:
        clock = _Clock()
        _sync(bench.device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = critic.model.generate(**inputs, max_new_tokens=bench.new_tokens, do_sample=False,
                                        pad_token_id=critic.pad_token_id, streamer=clock)
        _sync(bench.device)
        total = time.perf_counter() - start
        text = critic.tokenizer.decode(out[0, prompt_tokens:], skip_special_tokens=True).strip()
        assert out.shape[1] - prompt_tokens == bench.new_tokens
        return clock.first - start, clock.last - clock.first, total, text

    # The bare call runs where the engine's model calls run, on the critic's model thread: from a second thread
    # the model would start a second OpenMP team, and the two would slow each other whichever path is timed.
    paths = {"engine": engine, "bare": lambda: critic.on_model_thread(bare)}
    texts = {name: fn()[3] for name, fn in paths.items()}  # warm-up: kernels, allocator, caches
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in paths}
    for _ in range(bench.repeats):
        for name, fn in paths.items():  # alternating, so drift hits both alike
            runs[name].append(fn()[:3])
    figures = {}
    for name, times in runs.items():
        ttft, decoding, total = (statistics.median(run[i] for run in times) for i in range(3))
        figures[name] = {"ttft_ms": round(1000 * ttft, 2),
                         "tokens_per_s": round((bench.new_tokens - 1) / decoding, 2),
                         "answer_s": round(total, 4),
                         "runs_ttft_ms": [round(1000 * t, 2) for t, _, _ in times],
                         "runs_tokens_per_s": [round((bench.new_tokens - 1) / d, 2) for _, d, _ in times]}
    loss = 1 - figures["engine"]["tokens_per_s"] / figures["bare"]["tokens_per_s"]
    extra_ttft = figures["engine"]["ttft_ms"] - figures["bare"]["ttft_ms"]
    return {
        "bench": "critique streaming",
        "config": asdict(bench),
        "machine": machine(torch=torch.__version__, transformers=transformers.__version__,
                           torch_threads=torch.get_num_threads(),
                           device=torch.cuda.get_device_name() if bench.device.startswith("cuda") else "cpu"),
        "model": ("LLaVA-1.5-7B sizes, random weights" if bench.size == "7b"
                  else "tiny original-format LLaVA through the converter"),
        "parameters_m": round(sum(p.numel() for p in critic.model.parameters()) / 1e6, 1),
        "prompt_tokens": prompt_tokens,
        "same_text": texts["engine"] == texts["bare"],
        **figures,
        "tokens_per_s_loss": round(loss, 4),
        "extra_ttft_ms": round(extra_ttft, 2),
        "targets": TARGETS,
        "targets_met": {"tokens_per_s_loss_le_5pct": loss <= TARGETS["max_tokens_per_s_loss"],
                        "extra_ttft_le_50ms": extra_ttft <= TARGETS["max_extra_ttft_ms"]},
    }


def main() -> None:
    """Parse the options, run the benchmark, print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BenchConfig()
    parser.add_argument("--size", choices=("tiny", "7b"), default=defaults.size)
    parser.add_argument("--new-tokens", type=int, default=defaults.new_tokens)
    parser.add_argument("--repeats", type=int, default=defaults.repeats)
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=defaults.dtype)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args()
    print(json.dumps(run(BenchConfig(**vars(args))), indent=2))


if __name__ == "__main__":
    main()
