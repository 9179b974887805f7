"""Build the demo's artifacts: one PEFT LoRA per task on the shipped base, and (with --rebuild-base) the base.

Every artifact is an ordinary directory a user could pass to the CLI: the model and tokenizer are saved
with `save_pretrained`, the adapters in PEFT's format (adapter_config.json + adapter_model.safetensors).
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..bench.workload import TARGET_MODULES as LORA_TARGETS  # every projection of a Llama layer
from .tasks import ALPHABET, StringTask

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"


@dataclass(frozen=True)
class BaseRecipe:
    """The shipped base model (dlp_lora/demo/base-model/): a char-level Llama pretrained on the string
    primitives of tasks.py. `python -m dlp_lora.demo --rebuild-base` trains it again from this recipe.

    Measured with one thread on a shared 2-core machine: 2500 steps (~290 s) end at ~99% exact match on
    the primitives. With 1500 steps the base was weaker and seed dependent (89-96% on the primitives),
    and the add adapter then fell to 62% on one seed.
    """

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    pretrain_steps: int = 2500
    pretrain_lr: float = 3e-3
    batch_size: int = 64
    seed: int = 0


@dataclass(frozen=True)
class Recipe:
    """What the demo trains on top of the shipped base: one LoRA per task and the router, and the size
    of the evaluation. `Recipe()` is the full demo, `Recipe.smoke()` the test-sized one.

    Measured with one thread (CPU seconds of the process on a busy 2-core machine, about the wall time
    of an idle one): the five adapters, the router and the evaluation take ~110 s, for 94% oracle exact
    match on average (sort 78%, add 92%, the others 100%); at most 300 steps: ~125 s and 96%. The cap
    is also the cosine schedule's length, and a short schedule anneals sooner: at most 600 steps (and
    a 99% target) took ~250 s for 99%. The add adapter stays under 10% for ~150 steps and then jumps
    past 80%: with at most 200 steps it ended at 10%.
    """

    name: str = "demo"
    adapter_steps: int = 250  # at most (the cosine schedule's length); see adapter_target
    adapter_target: float = 0.97  # stop once the last 30 training batches (fresh samples) reach it
    adapter_lr: float = 1e-2
    lora_rank: int = 8
    lora_alpha: int = 16
    batch_size: int = 64
    eval_per_task: int = 50
    router_prompts_per_task: int = 300
    tasks: tuple[str, ...] = ("reverse", "sort", "add", "caesar", "double")
    seed: int = 0  # seeds the adapters, the router and their data streams (the base is fixed)

    @classmethod
    def smoke(cls) -> Recipe:
        return cls(name="smoke", adapter_steps=60, adapter_target=0.9, batch_size=32, eval_per_task=12,
                   router_prompts_per_task=60, tasks=("reverse", "caesar"))


@contextlib.contextmanager
def reproducible(seed: int) -> Iterator[None]:
    """Run the block with one torch thread, deterministic algorithms and the global RNG seeded with
    `seed`; restore all three afterwards.

    Why each: the float sums of a training step depend on how its work is split between threads, and a
    different rounding early in training ends it at a different step (early stopping) with different
    weights; the global RNG (LoRA initialisation, the router's dropout) would otherwise carry whatever
    ran before in the process, e.g. depend on which artifacts were cached.
    """
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
            torch.set_num_threads(threads)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No transformers progress bars in the block: its "Loading weights" and "Writing model shards"
    bars of a one-file model say nothing and add lines to every log."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def build_tokenizer(out_dir: str | Path | None = None):
    """A char-level Hugging Face tokenizer (WordLevel over single characters), saved with save_pretrained.

    Returns a PreTrainedTokenizerFast: pad/bos/eos/unk set, a BOS prepended by the post-processor, and
    decoding that joins characters back without separators.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = [PAD, BOS, EOS, UNK]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(ALPHABET)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # every character is its own token, whitespace included (the tasks' prompts contain spaces)
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                  unk_token=UNK, padding_side="left")
    if out_dir is not None:
        tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(directory: str | Path):
    """The demo tokenizer saved by build_tokenizer, left-padding for batched generation."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    tokenizer.padding_side = "left"
    return tokenizer


def build_base_model(tokenizer, recipe: BaseRecipe):
    """A randomly initialised LlamaForCausalLM sized by `recipe`, tied embeddings, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(recipe.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=recipe.hidden_size, intermediate_size=recipe.intermediate_size,
        num_hidden_layers=recipe.num_layers, num_attention_heads=recipe.num_heads,
        num_key_value_heads=recipe.num_heads, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config)


def encode_examples(tokenizer, pairs: list[tuple[str, str]]) -> dict[str, torch.Tensor]:
    """Right-padded training batch: BOS prompt answer EOS, loss on the answer and EOS only.

    Returns input_ids / attention_mask / labels, each [B, L] int64 (labels -100 where no loss).
    """
    rows, targets = [], []
    for prompt, answer in pairs:
        p = tokenizer(prompt)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append(p + a)
        targets.append([-100] * len(p) + a)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets, strict=True)):
        ids[i, : len(r)] = torch.tensor(r)
        labels[i, : len(t)] = torch.tensor(t)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@dataclass
class TrainLog:
    steps: int  # optimizer steps taken
    loss: float  # moving average of the training loss at the end
    exact_match: float  # share of the last `window` batches' examples answered exactly (teacher forcing)


def batch_exact_match(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, L, V] logits, [B, L] labels (-100 = no loss) -> [B] bool: every answer token is the argmax.

    Under teacher forcing this is exactly "greedy decoding reproduces the answer", so on fresh samples
    it estimates the held-out exact match for free."""
    pred, target = logits[:, :-1].argmax(-1), labels[:, 1:]
    return ((pred == target) | (target == -100)).all(dim=1)


def train_causal_lm(model, tokenizer, examples: Iterator[tuple[str, str]], *, steps: int, lr: float,
                    batch_size: int, desc: str, target_exact_match: float | None = None,
                    window: int = 30) -> TrainLog:
    """AdamW on the trainable parameters, linear warm-up and cosine decay over `steps`.

    `examples` must yield fresh samples: with `target_exact_match`, training stops early once the
    exact match over the last `window` batches reaches it (an online held-out estimate, since no
    sample is seen twice), so easy tasks do not pay for the steps the hard ones need.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    model.train()
    loss_avg = float("nan")
    recent: deque[float] = deque(maxlen=window)
    exact = 0.0
    # disable=None: a bar on a terminal, nothing in a log file
    bar = tqdm(range(steps), desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
    done = 0
    for step in bar:
        done = step + 1
        batch = encode_examples(tokenizer, [next(examples) for _ in range(batch_size)])
        out = model(**batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        loss_avg = loss if math.isnan(loss_avg) else 0.9 * loss_avg + 0.1 * loss
        recent.append(batch_exact_match(out.logits.detach(), batch["labels"]).float().mean().item())
        exact = sum(recent) / len(recent)
        bar.set_postfix(loss=f"{loss_avg:.3f}", exact=f"{exact:.1%}", refresh=False)
        if target_exact_match is not None and len(recent) == window and exact >= target_exact_match:
            break
    bar.close()
    model.eval()
    return TrainLog(steps=done, loss=loss_avg, exact_match=exact)


def pretrain_base(out_dir: str | Path, recipe: BaseRecipe, log=print) -> str:
    """Pretrain the demo's base model from `recipe` and save it with its tokenizer to `out_dir`
    (save_pretrained, safetensors). The same recipe and versions give the same bytes. Returns a note."""
    from . import tasks

    with reproducible(recipe.seed):
        tokenizer = build_tokenizer(out_dir)
        model = build_base_model(tokenizer, recipe)
        n = sum(p.numel() for p in model.parameters())
        log(f"pretraining a {n / 1e6:.2f}M-parameter char-level Llama on string primitives "
            f"({', '.join(tasks.PRIMITIVES)}): {recipe.pretrain_steps} steps of {recipe.batch_size}")
        primitives = tasks.stream(list(tasks.PRIMITIVES.values()), recipe.seed)
        done = train_causal_lm(model, tokenizer, primitives, steps=recipe.pretrain_steps,
                               lr=recipe.pretrain_lr, batch_size=recipe.batch_size, desc="pretrain base")
    with quiet_transformers():
        model.save_pretrained(str(out_dir), safe_serialization=True)
    return f"{done.exact_match:.1%} exact match on fresh primitive samples"


def lora_config(recipe: Recipe):
    from peft import LoraConfig

    return LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=0.0,
                      target_modules=list(LORA_TARGETS), task_type="CAUSAL_LM")


def train_adapter(base_dir: str | Path, tokenizer, task: StringTask, examples, recipe: Recipe,
                  out_dir: str | Path) -> TrainLog:
    """Train one rank-r LoRA on all seven projections of the base for `task` (at most
    recipe.adapter_steps, fewer once it answers recipe.adapter_target of fresh samples exactly);
    save it in PEFT format. Seeded by recipe.seed and the task's name, whatever ran before."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    with reproducible(recipe.seed + 1 + sum(map(ord, task.name))):
        with warnings.catch_warnings():
            # peft 0.21 calls a transformers 5 method that is deprecated; nothing the demo can act on
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            model = get_peft_model(base, lora_config(recipe))
        log = train_causal_lm(model, tokenizer, examples, steps=recipe.adapter_steps, lr=recipe.adapter_lr,
                              batch_size=recipe.batch_size, desc=f"adapter {task.name}",
                              target_exact_match=recipe.adapter_target)
    model.save_pretrained(str(out_dir))
    return log
