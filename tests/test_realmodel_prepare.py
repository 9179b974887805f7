"""The GGUF -> plain HF directory conversion of dlp_lora.realmodel.prepare, on a tiny Llama GGUF
written here with the `gguf` package (no download): same logits and tokens as transformers' own
GGUF loading, loadable without gguf_file, cached, and clear errors for bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from dlp_lora.realmodel.prepare import SOURCE_FILE, PrepareError, convert  # noqa: E402

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 4, 2
WORDS = ["hello", "world", "the", "end", "cat", "sat"]


def _vocab() -> tuple[list[str], list[str]]:
    """A byte-level BPE vocabulary: special tokens, the 256 byte symbols, a few merges."""
    from tokenizers import pre_tokenizers

    tokens = ["<unk>", "<s>", "</s>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = []
    for word in WORDS:
        for piece in ("\u0120" + word, word):
            current = piece[0]
            for ch in piece[1:]:
                merged = current + ch
                if merged not in tokens:
                    merges.append(f"{current} {ch}")
                    tokens.append(merged)
                current = merged
    return tokens, merges


def write_tiny_llama_gguf(path) -> None:
    tokens, merges = _vocab()
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_context_length(64)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HIDDEN // HEADS)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    def tensor(name, *shape):
        w.add_tensor(name, (rng.standard_normal(shape) * 0.2).astype(np.float32))

    head_dim = HIDDEN // HEADS
    tensor("token_embd.weight", len(tokens), HIDDEN)
    for i in range(LAYERS):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", HIDDEN, HIDDEN)
        tensor(f"blk.{i}.attn_k.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_v.weight", KV_HEADS * head_dim, HIDDEN)
        tensor(f"blk.{i}.attn_output.weight", HIDDEN, HIDDEN)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(HIDDEN, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_up.weight", FFN, HIDDEN)
        tensor(f"blk.{i}.ffn_down.weight", HIDDEN, FFN)
    w.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    tensor("output.weight", len(tokens), HIDDEN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    write_tiny_llama_gguf(path)
    return path


def test_convert_matches_transformers_gguf_loading(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = convert(tiny_gguf, tmp_path / "model")
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == LAYERS
    plain = AutoModelForCausalLM.from_pretrained(str(out)).eval()  # no gguf_file: a plain directory
    direct = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name).eval()
    tok_plain = AutoTokenizer.from_pretrained(str(out))
    tok_direct = AutoTokenizer.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name)
    text = "hello world the cat sat"
    ids = tok_plain(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tok_direct(text, return_tensors="pt")["input_ids"].tolist()
    assert tok_plain.decode(ids[0], skip_special_tokens=True).strip() == text
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, direct(ids).logits, rtol=0, atol=0)
    for name, tensor in direct.state_dict().items():
        torch.testing.assert_close(plain.state_dict()[name], tensor, rtol=0, atol=0)


def test_convert_is_cached_and_redone_for_another_file(tiny_gguf, tmp_path):
    out = convert(tiny_gguf, tmp_path / "model")
    weights = out / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert convert(tiny_gguf, out) == out and weights.stat().st_mtime_ns == stamp  # reused
    record = json.loads((out / SOURCE_FILE).read_text())
    record["bytes"] += 1  # as if converted from another file: converted again
    (out / SOURCE_FILE).write_text(json.dumps(record))
    convert(tiny_gguf, out)
    assert json.loads((out / SOURCE_FILE).read_text())["bytes"] == tiny_gguf.stat().st_size
    assert not (tmp_path / "model.partial").exists()


def test_convert_refuses_a_missing_file(tmp_path):
    with pytest.raises(PrepareError, match="GGUF file not found"):
        convert(tmp_path / "absent.gguf", tmp_path / "model")
    assert not (tmp_path / "model").exists()
