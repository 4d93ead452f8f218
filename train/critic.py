"""Fine-tune a critic (a LLaVA-style VLM) from critique votes (DPO) or from critique texts (SFT), with ArtGPT-4's
image adapters or a LoRA, and register the result as a new critique system beside its parent.

- `--method adapters`: `up(GELU(down(x))) + x` in every decoder layer (engines/adapters.py); trainable as ArtGPT-4:
  the adapters, every post_attention_layernorm, the input_layernorm of even layers, and the image projection.
  Saved as `adapters.safetensors` plus `weights.safetensors` (the model tensors the run changed), which the
  critic's `adapters` and `weights` settings load.
- `--method lora`: a peft LoRA on the language model's attention projections (the vision tower is untouched),
  saved as a peft folder `lora/` that the critic's `lora` setting merges in.
- DPO on critique votes: for the question and image of a battle, the chosen and the rejected answer; with the
  answer tokens' log-likelihood under the policy (π) and under the frozen parent (ref: the same model with the
  adapters or the LoRA switched off, computed once before training), loss = −log σ(β·[(log π(c) − log ref(c)) −
  (log π(r) − log ref(r))]). Ties and "both bad" are left out. Held-out preference accuracy is the share of test
  pairs whose implicit reward margin is positive (a zero margin counts half, so the parent scores 0.5).
- SFT on a JSON-lines or CSV file of image, question, answer (image paths relative to the file): cross-entropy on
  the answer tokens only; the held-out answer NLL is reported before and after.

The prompt is the critic's own (`Critic.inputs`), so training sees exactly what the arena serves.

    python -m train.critic --home data --parent tiny-llava --out runs/critic --method adapters --objective dpo
    python -m train.critic --parent tiny-llava --out runs/sft --method lora --objective sft --texts critiques.csv
    accelerate launch --multi_gpu --num_processes 2 -m train.critic …
"""
from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import io
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from accelerate import Accelerator, PartialState
from accelerate.utils import set_seed
from peft import LoraConfig, get_peft_model
from PIL import Image
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from engines.adapters import ImageAdapters, artgpt4_trainable, decoder_layers
from engines.critic import Critic, CriticSettings
from engines.images import load_image
from study.blobs import BlobStore
from study.db import default_url, make_engine
from study.votes import VoteService
from train.data import PairFilter, load_pairs, split_of
from train.runs import StepTimer, checkpoint_path, data_hash, finished_at, latest_checkpoint, write_run_card

TASK = "critique"
OBJECTIVES = ("dpo", "sft")
METHODS = ("adapters", "lora")
ADAPTERS, WEIGHTS, LORA = "adapters.safetensors", "weights.safetensors", "lora"
FIELDS = ("image", "question", "answer")  # the columns of an SFT file


@dataclass(frozen=True)
class CriticTrainConfig:
    """The parent critic, the method, the objective and its data, and the optimization settings."""

    home: Path
    out: Path
    parent: str  # a critique system of the vote store
    objective: str = "dpo"
    method: str = "adapters"
    texts: Path | None = None  # SFT: JSON lines or CSV of image, question, answer
    name: str = ""  # the trained system's name; default: "<parent>+<method>"
    db: str | None = None
    steps: int = 100
    batch_size: int = 2
    lr: float = 1e-4
    beta: float = 0.1
    rank: int = 8  # LoRA only
    checkpoint_every: int = 50
    seed: int = 0
    filters: PairFilter = field(default_factory=PairFilter)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if (self.objective == "sft") != (self.texts is not None):
            raise ValueError("SFT takes its critiques from --texts, and only SFT does")
        if (self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.beta <= 0 or self.rank < 1
                or self.checkpoint_every < 1):
            raise ValueError(f"invalid critic training settings: {self}")


@dataclass(frozen=True)
class Example:
    """One training or evaluation example: an image, a question, and one answer (SFT) or two (DPO)."""

    image: Image.Image
    question: str
    chosen: str
    rejected: str | None
    split: str


class Trainable(nn.Module):
    """The critic's model with what the run trains (image adapters, or a LoRA inside a peft model) as one module,
    so that DDP sees and syncs the trained weights."""

    def __init__(self, model: nn.Module, adapters: ImageAdapters | None = None) -> None:
        super().__init__()
        self.model, self.adapters = model, adapters

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.model(**inputs).logits

    def parent(self) -> AbstractContextManager[None]:
        """Inside the block the module is the frozen parent (the DPO reference): adapters or LoRA switched off."""
        return self.adapters.disabled() if self.adapters is not None else self.model.disable_adapter()


def lora_targets(model: nn.Module) -> list[str]:
    """The full names of the language model's attention projections: the linear layers of each decoder layer's
    self-attention (the vision tower has attention projections too, which stay untouched)."""
    names = {id(module): name for name, module in model.named_modules()}
    return [f"{names[id(layer.self_attn)]}.{child}" for layer in decoder_layers(model)
            for child, module in layer.self_attn.named_children() if isinstance(module, nn.Linear)]


def attach(model: nn.Module, method: str, rank: int) -> tuple[Trainable, list[str]]:
    """The model with the method's trainable parts added and everything else frozen, and the names it trains."""
    if method == "adapters":
        adapters = ImageAdapters.for_model(model).attach(model)
        return Trainable(model, adapters), artgpt4_trainable(model, adapters)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=lora_targets(model)))
    return Trainable(peft_model), [n for n, p in peft_model.named_parameters() if p.requires_grad]


def _records(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, record) of a CSV file with a header row, or of JSON lines (any other suffix)."""
    text = path.read_text(encoding="utf-8-sig")  # a spreadsheet's CSV may start with a byte-order mark
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield reader.line_num, row
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield number, json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path} line {number}: not JSON ({error})") from None


def read_texts(path: Path, filters: PairFilter) -> tuple[list[Example], str]:
    """SFT examples from a file of image, question, answer, and a hash of its texts and image bytes; a bad line
    is refused with its number."""
    path = Path(path)
    examples, digest = [], hashlib.sha256()
    try:
        for number, row in _records(path):
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) and row[k].strip() for k in FIELDS):
                raise ValueError(f"{path} line {number}: expected non-empty text in each of {', '.join(FIELDS)}")
            try:
                data = (path.parent / row["image"]).read_bytes()
                image = load_image(data)
            except (OSError, ValueError) as error:
                raise ValueError(f"{path} line {number}: cannot read the image {row['image']!r} ({error})") from None
            question, answer = row["question"].strip(), row["answer"].strip()
            for part in (data, question.encode(), answer.encode()):
                digest.update(hashlib.sha256(part).digest())
            examples.append(Example(image, question, answer, None, split_of(question, filters)))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    if not examples:
        raise ValueError(f"{path} holds no critiques")
    return examples, digest.hexdigest()


def vote_examples(pairs: pd.DataFrame, blobs: BlobStore) -> list[Example]:
    """DPO examples from critique votes with a winner; battles stored without their image are skipped.

    `train.data.decided` gives the same chosen/rejected outputs but drops the battle's metadata, where the critique
    tab keeps the uploaded image, so the rows are read here."""
    examples = []
    for row in pairs[pairs.choice.isin(["a", "b"])].itertuples():
        image_sha = (row.meta or {}).get("image")
        if not image_sha:
            continue
        a, b = blobs.get(row.output_a).decode(), blobs.get(row.output_b).decode()
        chosen, rejected = (a, b) if row.choice == "a" else (b, a)
        examples.append(Example(load_image(blobs.get(image_sha)), row.prompt, chosen, rejected, row.split))
    return examples


def answer_token_count(tokenizer: Any, prompt: str, whole: str) -> int:
    """How many tokens the answer adds when it is tokenized together with its prompt, as the model reads a served
    answer. Tokenized alone, " good" is not always the tokens it is after the prompt: Llama's SentencePiece
    tokenizer makes it "▁", "▁good" instead of "▁good"."""
    before = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    after = tokenizer(whole, add_special_tokens=False)["input_ids"]
    shared = next((i for i, (x, y) in enumerate(zip(before, after)) if x != y), min(len(before), len(after)))
    return len(after) - shared


class Encoder:
    """Batches of prompt + answer sequences through the critic's own prompt and processor, with a mask of the
    answer tokens (the answer and the end-of-sequence token, nothing of the prompt)."""

    def __init__(self, critic: Critic) -> None:
        self.critic = critic
        self.eos = critic.tokenizer.eos_token_id

    def __call__(self, items: Sequence[tuple[Image.Image, str, str]]) -> dict[str, torch.Tensor]:
        rows, pixels = [], []
        for image, question, answer in items:
            # The answer as an answer prefix: the critic puts it after the generation prompt as it serves answers.
            inputs = self.critic.inputs(image, question, answer_prefix=" " + answer, reserve=1)
            answer_length = answer_token_count(self.critic.tokenizer, self.critic.prompt([], question),
                                               self.critic.prompt([], question, " " + answer))
            ids = torch.cat([inputs["input_ids"][0].cpu(), torch.tensor([self.eos])])
            rows.append((ids, len(ids) - answer_length - 1))
            pixels.append(inputs["pixel_values"][0].cpu())
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.critic.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        answer_mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for i, (ids, prompt_length) in enumerate(rows):
            input_ids[i, :len(ids)], attention[i, :len(ids)] = ids, 1
            answer_mask[i, prompt_length:len(ids)] = True
        return {"input_ids": input_ids, "attention_mask": attention, "pixel_values": torch.stack(pixels),
                "answer_mask": answer_mask}


def answer_logprobs(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each sequence's summed log-likelihood of its answer tokens."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = batch["input_ids"][:, 1:]
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (picked * batch["answer_mask"][:, 1:]).sum(-1)


def _model_inputs(batch: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device),
            "pixel_values": batch["pixel_values"].to(device, dtype)}


def _sequences(examples: Sequence[Example]) -> list[tuple[Image.Image, str, str]]:
    """Chosen answers first, then rejected ones (DPO), in one list, so one forward scores both."""
    chosen = [(e.image, e.question, e.chosen) for e in examples]
    return chosen + [(e.image, e.question, e.rejected) for e in examples if e.rejected is not None]


@torch.no_grad()
def _logprobs(module: nn.Module, encode: Encoder, examples: Sequence[Example], device: torch.device,
              dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Answer log-likelihoods (chosen, rejected) of examples, one example at a time; answer token counts too."""
    scores, tokens = [], []
    for example in examples:
        batch = encode(_sequences([example]))
        scores.append(answer_logprobs(module(**_model_inputs(batch, device, dtype)), {
            k: v.to(device) for k, v in batch.items()}).cpu().numpy())
        tokens.append(batch["answer_mask"].sum(-1).numpy())
    return np.array(scores), np.array(tokens)


def _metrics(objective: str, policy: np.ndarray, reference: np.ndarray, tokens: np.ndarray) -> dict[str, float | None]:
    """DPO: preference accuracy (implicit reward margin > 0; a zero margin, the parent's, counts half) and the mean
    log-likelihood margin chosen − rejected; SFT: the answer's mean negative log-likelihood per token."""
    if not len(policy):
        return {}
    if objective == "sft":
        return {"answer_nll_per_token": float(-(policy[:, 0] / tokens[:, 0]).mean())}
    margin = (policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1])
    return {"preference_accuracy": float(np.mean((margin > 0) + 0.5 * (margin == 0))),
            "loglik_margin": float((policy[:, 0] - policy[:, 1]).mean())}


def _parent(votes: VoteService, parent: str, method: str) -> tuple[str, dict[str, Any]]:
    """The parent's engine and settings; refused when it already carries what this method would train."""
    for system in votes.systems(TASK, enabled_only=False):
        if system.name == parent:
            CriticSettings.from_settings(system.config)
            if system.config.get(method):
                raise ValueError(f"{parent} already has trained {method}; train from a critic without them")
            return system.engine, dict(system.config)
    raise ValueError(f"there is no critique system {parent!r} in the vote store")


def _examples(config: CriticTrainConfig, engine: Any, blobs: BlobStore) -> tuple[list[Example], dict[str, Any]]:
    """The run's examples and what the run card says of their source (hash and counts)."""
    if config.objective == "sft":
        examples, digest = read_texts(config.texts, config.filters)
        return examples, {"hash": digest, "texts": str(config.texts), "critiques": len(examples)}
    pairs = load_pairs(engine, TASK, config.filters)
    examples = vote_examples(pairs, blobs)
    return examples, {"hash": data_hash(pairs), "votes": len(pairs),
                      "decided_votes": int(pairs.choice.isin(["a", "b"]).sum()),
                      "filters": asdict(config.filters)}


def _save(module: Trainable, trainable: Sequence[str], out: Path) -> dict[str, str]:
    """Write what the run trained into its folder, and return the critic settings that load it."""
    if module.adapters is not None:
        module.adapters.save(out / ADAPTERS)
        changed = set(trainable)
        save_file({k: v.detach().cpu().contiguous() for k, v in module.model.state_dict().items() if k in changed},
                  out / WEIGHTS)
        return {"adapters": str((out / ADAPTERS).resolve()), "weights": str((out / WEIGHTS).resolve())}
    module.model.save_pretrained(out / LORA)
    return {"lora": str((out / LORA).resolve())}


def train(config: CriticTrainConfig) -> dict[str, Any]:
    """Train the adapters or the LoRA, save them, register the trained critic, write the run card."""
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    set_seed(config.seed)
    engine = make_engine(config.db or default_url(config.home))
    blobs = BlobStore(config.home / "blobs")
    votes = VoteService(engine, blobs)
    engine_name, parent = _parent(votes, config.parent, config.method)
    examples, data = _examples(config, engine, blobs)
    train_set = [e for e in examples if e.split == "train"]
    test_set = [e for e in examples if e.split == "test"]
    if not train_set:
        raise ValueError("no training examples: no decided critique votes with their image, or every prompt is in "
                         "the test split")
    with accelerator.main_process_first():  # the first process writes and converts the tiny checkpoint, once
        critic = Critic(parent, device=str(device), dtype="float32", home=config.home)
    # A copy to train: the loaded model is shared with every critic of the same settings in this process.
    model, encode = copy.deepcopy(critic.model), Encoder(critic)
    dtype = model.dtype
    module, trainable = attach(model, config.method, config.rank)
    module.eval()
    with module.parent():  # the frozen parent: the DPO reference, and the "before" of every metric
        reference_train = _logprobs(module, encode, train_set, device, dtype)[0] if config.objective == "dpo" else None
        reference_test, test_tokens = _logprobs(module, encode, test_set, device, dtype)
    before = _metrics(config.objective, reference_test, reference_test, test_tokens)
    loader = DataLoader(list(enumerate(train_set)), batch_size=config.batch_size, shuffle=True,
                        collate_fn=lambda batch: batch)
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=config.lr)
    module.train()
    wrapped, optimizer, loader = accelerator.prepare(module, optimizer, loader)
    step, resumed = 0, None
    if (latest := latest_checkpoint(config.out)) is not None:
        step, path = latest
        accelerator.load_state(str(path))
        resumed = step
    history: list[float] = []
    timer = StepTimer()
    bar = tqdm(total=config.steps, initial=step, desc=f"critic {config.method} {config.objective}",
               disable=not accelerator.is_main_process)
    while step < config.steps:
        for items in loader:
            batch = encode(_sequences([e for _, e in items]))
            scores = answer_logprobs(wrapped(**_model_inputs(batch, device, dtype)),
                                     {k: v.to(device) for k, v in batch.items()})
            if reference_train is None:  # SFT: the answers' mean NLL per token
                loss = -(scores / batch["answer_mask"].sum(-1).to(device)).mean()
            else:
                ref = torch.as_tensor(reference_train[[i for i, _ in items]], device=device)
                policy_c, policy_r = scores.chunk(2)
                inside = config.beta * ((policy_c - ref[:, 0]) - (policy_r - ref[:, 1]))
                loss = -F.logsigmoid(inside).mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            history.append(float(loss.detach()))
            timer.tick()
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]:.4f}")
            if step % config.checkpoint_every == 0 or step == config.steps:
                accelerator.save_state(str(checkpoint_path(config.out, step)))
            if step >= config.steps:
                break
    bar.close()
    accelerator.wait_for_everyone()
    module = accelerator.unwrap_model(wrapped).eval()
    after = _metrics(config.objective, _logprobs(module, encode, test_set, device, dtype)[0], reference_test,
                     test_tokens)
    name = config.name or f"{config.parent}+{config.method}"
    card = {
        "task": TASK, "trainer": "train.critic", "parent": config.parent, "system": name,
        "objective": config.objective, "method": config.method,
        "data": {**data, "examples": {"train": len(train_set), "test": len(test_set)}},
        "settings": {k: v for k, v in asdict(config).items() if k not in ("home", "out", "filters", "db", "texts")},
        "trainable_tensors": len(trainable),
        "trainable_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "processes": accelerator.num_processes, "resumed_from_step": resumed, "steps": step,
        "metrics": {**{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()}},
        "first_loss": history[0] if history else None, "last_loss": history[-1] if history else None,
        "median_step_s": timer.median, "finished_at": finished_at(),
    }
    if accelerator.is_main_process:
        settings = {**parent, **_save(module, trainable, config.out)}
        written = write_run_card(config.out, card)
        votes.register_system(TASK, name, engine=engine_name, config=settings, source="trained",
                              parent=config.parent, version=data["hash"][:12], run_card=written)
    return card


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the options, train, print the run card."""
    parser = argparse.ArgumentParser(prog="python -m train.critic", description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path("data"))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parent", required=True, help="the critique system to fine-tune")
    parser.add_argument("--objective", choices=OBJECTIVES, default="dpo")
    parser.add_argument("--method", choices=METHODS, default="adapters")
    parser.add_argument("--texts", type=Path, help="SFT: JSON lines or CSV of image, question, answer")
    parser.add_argument("--name", default="", help="the trained system's name (default: PARENT+METHOD)")
    parser.add_argument("--db", help="SQLAlchemy URL (default: SQLite under the data home)")
    defaults = CriticTrainConfig(Path(), Path(), "")
    for option in ("steps", "batch_size", "rank", "checkpoint_every", "seed"):
        parser.add_argument(f"--{option.replace('_', '-')}", type=int, default=getattr(defaults, option))
    for option in ("lr", "beta"):
        parser.add_argument(f"--{option}", type=float, default=getattr(defaults, option))
    parser.add_argument("--test-share", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        card = train(CriticTrainConfig(
            args.home, args.out, args.parent, objective=args.objective, method=args.method, texts=args.texts,
            name=args.name, db=args.db, steps=args.steps, batch_size=args.batch_size, lr=args.lr, beta=args.beta,
            rank=args.rank, checkpoint_every=args.checkpoint_every, seed=args.seed,
            filters=PairFilter(test_share=args.test_share)))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if PartialState().is_main_process:
        print(json.dumps(card, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
