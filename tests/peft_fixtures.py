"""Tiny transformers models, a word-level tokenizer and real PEFT adapters, all built offline.

Adapters are made by PEFT itself (get_peft_model -> random non-zero lora_B -> save_pretrained),
so the loader is tested on exactly what users have on disk, and PeftModel is the oracle.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

ARCHS = ("llama", "qwen2", "mistral", "gpt2")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # transformers Conv1D (weight [in, out])
SPECIAL = ["<pad>", "<unk>", "<eos>"]
PUNCT = [".", "!", "?", ","]
FILLER = ["the", "a", "of", "and", "to", "is", "in", "it"]
TASKS = ("alpha", "beta", "gamma")
TASK_WORDS = {task: [f"{task[:2]}{i}" for i in range(8)] for task in TASKS}
VOCAB_SIZE = 96  # >= the tokenizer's 66 words; extra ids are never produced by the tokenizer


def cache_kwarg() -> str:
    """The name of the KV cache, as a forward keyword and as an output field.

    transformers 5.2x renamed it from ``past_key_values`` to ``cache`` (the old keyword is accepted
    until 5.40); the GPU image's transformers 5.17 knows only the old name.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def word_tokenizer():
    """A word-level PreTrainedTokenizerFast over SPECIAL + PUNCT + FILLER + every task word."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = SPECIAL + PUNCT + FILLER + [w for task in TASKS for w in TASK_WORDS[task]]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "word." into "word" "."
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )


def task_sentence(task: str, rng: torch.Generator, length: int = 8, p_task: float = 0.75) -> str:
    """`length` words: from the task's own words with probability p_task, else shared filler."""
    words = []
    for _ in range(length):
        pool = TASK_WORDS[task] if torch.rand(1, generator=rng).item() < p_task else FILLER
        words.append(pool[int(torch.randint(len(pool), (1,), generator=rng))])
    return " ".join(words)


def tiny_model(arch: str, seed: int = 0, vocab_size: int = VOCAB_SIZE, hidden: int = 32):
    """A 2-layer fp32 causal LM of ``arch`` (eager attention, eval mode), deterministic in ``seed``."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    if arch == "gpt2":
        config = tf.GPT2Config(n_embd=hidden, n_layer=2, n_head=4, n_positions=128, **common)
        cls = tf.GPT2LMHeadModel
    else:
        config_cls, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
        }[arch]
        config = config_cls(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **common,
        )
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():  # HF inits some biases to zero; random ones make the tests sharper
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.02)
    return model


def targets(arch: str) -> list[str]:
    return GPT2_TARGETS if arch == "gpt2" else LLAMA_TARGETS


def make_adapter(base, directory: Path, seed: int, **lora_kwargs) -> Path:
    """Save a PEFT LoRA adapter for ``base`` with random A and random non-zero B; returns the directory."""
    from peft import LoraConfig, get_peft_model

    is_gpt2 = base.config.model_type == "gpt2"
    lora_kwargs.setdefault("target_modules", GPT2_TARGETS if is_gpt2 else LLAMA_TARGETS)
    lora_kwargs.setdefault("r", 4)
    lora_kwargs.setdefault("lora_alpha", 8)
    if is_gpt2:
        lora_kwargs.setdefault("fan_in_fan_out", True)
    torch.manual_seed(seed)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(task_type="CAUSAL_LM", **lora_kwargs))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.normal_(0, 0.3)
    peft_model.save_pretrained(str(directory))
    return Path(directory)


def peft_oracle(base, adapters: dict[str, Path], active: str | None = None):
    """A PeftModel on a copy of ``base`` with every adapter loaded, ``active`` (default: the first) set."""
    from peft import PeftModel

    names = list(adapters)
    model = PeftModel.from_pretrained(copy.deepcopy(base), str(adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(adapters[name]), adapter_name=name)
    model.set_adapter(active or names[0])
    return model.eval()


def left_pad(sequences: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids [B, L] and attention_mask [B, L], left-padded to the longest sequence."""
    longest = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    mask = torch.zeros(len(sequences), longest, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, longest - len(s) :] = torch.tensor(s)
        mask[i, longest - len(s) :] = 1
    return ids, mask


def model_snapshot(model) -> dict:
    """Everything a failed patch must leave unchanged: state_dict, classes, buffers, hooks, repr."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes": {n: type(m) for n, m in model.named_modules()},
        "buffers": sorted(n for n, _ in model.named_buffers()),
        "hooks": (len(model._forward_pre_hooks), len(model._forward_hooks)),
        "attrs": sorted(model.__dict__),
        "repr": repr(model),
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert before["state"].keys() == after["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(value, after["state"][key]), key
    for key in ("classes", "buffers", "hooks", "attrs", "repr"):
        assert before[key] == after[key], key


def default_backend() -> str | None:
    """None (automatic: the compiled CPU kernel) once it is built, else the reference backend."""
    from dlp_lora import ops

    if ops.load_extension() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
        "dlp_lora::multi_lora", "CPU"
    ):
        return None
    return "reference"


class CountingRouter:
    """Router stand-in: probability of a task ~ 0.5 + how many of its words the text holds."""

    def __init__(self, tokenizer, label_names=TASKS):
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.word_ids = [set(tokenizer.convert_tokens_to_ids(TASK_WORDS[t])) for t in self.label_names]
        self.calls: list[list[list[int]]] = []  # the real tokens of every routed row

    def probs(self, input_ids, attention_mask=None):
        rows = [
            [t for t, m in zip(ids, mask, strict=True) if m]
            for ids, mask in zip(input_ids.tolist(), attention_mask.tolist(), strict=True)
        ]
        self.calls.append(rows)
        counts = torch.tensor([[sum(t in words for t in row) for words in self.word_ids] for row in rows])
        return (counts + 0.5) / (counts + 0.5).sum(-1, keepdim=True)

    def route(self, input_ids, attention_mask=None, *, top_p=0.6, max_loras=None):
        from dlp_lora.router import route_top_p

        return route_top_p(self.probs(input_ids, attention_mask), top_p, max_loras)

    def mixture(self, tokens: list[int], top_p: float) -> dict[str, float]:
        ids, weights = self.route(torch.tensor([tokens]), torch.ones(1, len(tokens)), top_p=top_p)
        return {
            self.label_names[i]: w
            for i, w in zip(ids[0].tolist(), weights[0].tolist(), strict=True)
            if i >= 0
        }


# Router weights of a row batched with others differ from the row alone in the last float32 digits
# (a batched GEMM rounds differently from a single row's, and differently on another CPU).
ROUTING_WEIGHT_ATOL = 1e-5


def assert_same_routing(got, expected) -> None:
    """RoutingRecords: step, position, adapters and reason exactly; weights within ROUTING_WEIGHT_ATOL."""
    import pytest

    assert [(r.step, r.position, r.adapters, r.reason) for r in got] == [
        (r.step, r.position, r.adapters, r.reason) for r in expected]
    for g, e in zip(got, expected, strict=True):
        assert g.weights == pytest.approx(e.weights, abs=ROUTING_WEIGHT_ATOL), (g, e)
