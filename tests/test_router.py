"""Router: hashing, padding invariance, training on separable tasks, routing, save/load, bad input.

The tokenizer is a word-level one built here with the `tokenizers` library (no downloads).
"""

import random
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch import nn
from transformers import PreTrainedTokenizerFast

from dlp_lora import Router, route_top_p
from dlp_lora.router import hashed_features

TASKS = ("math", "german", "code", "poetry")
SHARED = [f"w{i}" for i in range(40)]
VOCAB = {task: [f"{task}{i}" for i in range(25)] for task in TASKS}
SMALL = dict(num_buckets=2**12, embed_dim=32, hidden=64, dropout=0.0)


def make_tokenizer() -> PreTrainedTokenizerFast:
    words = ["[UNK]", "[PAD]", "<s>", "."] + SHARED + [w for v in VOCAB.values() for w in v]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>")


def make_texts(n_per_task: int, seed: int) -> tuple[list[str], list[str]]:
    """Sentences of 4-12 words, ~40% from the task's own vocabulary, the rest shared."""
    rng = random.Random(seed)
    texts, labels = [], []
    for task in TASKS:
        for _ in range(n_per_task):
            words = [rng.choice(VOCAB[task]) if rng.random() < 0.4 else rng.choice(SHARED)
                     for _ in range(rng.randint(4, 12))]
            words[rng.randrange(len(words))] = rng.choice(VOCAB[task])  # at least one task word
            texts.append(" ".join(words) + " .")
            labels.append(task)
    return texts, labels


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def trained(tokenizer):
    texts, labels = make_texts(120, seed=1)
    return Router.fit(texts, labels, tokenizer, verbose=False, **SMALL)  # default schedule


def _pad(seqs: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    L = max(map(len, seqs))
    ids = torch.full((len(seqs), L), 1, dtype=torch.long)  # 1 = [PAD], arbitrary: the mask decides
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
        ids[i, sl], mask[i, sl] = torch.tensor(s), 1
    return ids, mask


# ----------------------------------------------------------------------------- hashing


def _python_buckets(seq: list[int], num_buckets: int) -> tuple[list[int], list[int]]:
    """The documented hash written with Python ints (arbitrary precision: no overflow possible)."""
    M = 2**31 - 1
    uni = [(t % M) * 1_000_000_007 % M % num_buckets for t in seq]
    bi = [(((a % M) * 1_000_003 + b % M) % M * 998_244_353 + 754_974_721) % M % num_buckets
          for a, b in zip(seq[:-1], seq[1:], strict=True)]
    return uni, bi


def test_hash_matches_python_ints_including_huge_ids():
    seq = [0, 5, 151_643, 2**31 - 2, 2**31 + 7, 2**40 + 3, 7]
    got = hashed_features(torch.tensor([seq]), None, 2**16)
    uni, bi = _python_buckets(seq, 2**16)
    assert got.shape == (1, 2, len(seq))
    assert got[0, 0].tolist() == uni and got[0, 1].tolist() == [2**16] + bi
    assert len(set(uni + bi)) == len(uni + bi)  # no collisions among these few


def test_hash_ignores_padding_position():
    seqs = [[5, 9, 2, 7], [3, 3], [11]]
    right = hashed_features(*_pad(seqs, "right"), 97)
    left = hashed_features(*_pad(seqs, "left"), 97)
    for i, s in enumerate(seqs):
        for kind, expect in enumerate(_python_buckets(s, 97)):
            for feats in (right, left):
                assert sorted(x for x in feats[i, kind].tolist() if x != 97) == sorted(expect)


# ----------------------------------------------------------------------------- architecture


def test_default_architecture_is_about_5m_parameters():
    router = Router([f"task{i}" for i in range(26)])
    n = sum(p.numel() for p in router.parameters())
    assert 3_000_000 <= n <= 8_000_000
    assert sum(isinstance(m, torch.nn.Linear) for m in router.modules()) == 4


def test_left_and_right_padding_give_identical_logits():
    router = Router(list(TASKS), **SMALL).eval()
    seqs = [torch.randint(0, 500, (n,)).tolist() for n in (7, 3, 12, 1)]
    right = router(*_pad(seqs, "right"))
    left = router(*_pad(seqs, "left"))
    alone = torch.cat([router(torch.tensor([s])) for s in seqs])
    torch.testing.assert_close(left, right, rtol=0, atol=1e-6)
    torch.testing.assert_close(left, alone, rtol=0, atol=1e-6)
    assert left.dtype == torch.float32 and left.shape == (4, len(TASKS))
    assert not torch.allclose(left[0], left[1])  # different prompts, different logits


# ----------------------------------------------------------------------------- training and routing


def test_trained_router_routes_held_out_prompts(trained, tokenizer):
    assert trained.label_names == sorted(TASKS)
    assert trained.val_accuracy is not None and trained.val_accuracy >= 0.9
    texts, labels = make_texts(50, seed=2)  # fresh sentences
    predicted = trained.predict(texts)
    accuracy = sum(p == y for p, y in zip(predicted, labels, strict=True)) / len(labels)
    assert accuracy >= 0.95

    enc = tokenizer(texts[::25], padding=True, return_tensors="pt")
    lora_ids, weights = trained.route(enc["input_ids"], enc["attention_mask"], top_p=0.6)
    expect_top = [trained.label_names.index(y) for y in labels[::25]]
    assert lora_ids[:, 0].tolist() == expect_top
    assert lora_ids.dtype == torch.int32 and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(1), torch.ones(len(expect_top)))
    # route() is route_top_p over probs()
    ref_ids, ref_w = route_top_p(trained.probs(enc["input_ids"], enc["attention_mask"]), 0.6)
    assert torch.equal(lora_ids, ref_ids) and torch.allclose(weights, ref_w)


def test_route_restores_training_mode(trained):
    trained.train(True)
    try:
        trained.route(torch.tensor([[5, 6, 7]]))
        assert trained.training
    finally:
        trained.eval()


def test_training_is_deterministic(tokenizer):
    texts, labels = make_texts(10, seed=3)
    a = Router.fit(texts, labels, tokenizer, epochs=2, verbose=False, **SMALL)
    b = Router.fit(texts, labels, tokenizer, epochs=2, verbose=False, **SMALL)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(pa, pb), name


def test_train_prints_held_out_accuracy(tokenizer, capsys):
    texts, labels = make_texts(10, seed=4)
    Router.fit(texts, labels, tokenizer, epochs=1, verbose=True, **SMALL)
    assert "held-out accuracy" in capsys.readouterr().out


def test_progress_in_a_log_is_one_line_per_epoch(tmp_path):
    """Off a terminal (a log file, CI, a server), no progress bar: one line per epoch, no carriage returns."""
    import subprocess
    import sys

    log = tmp_path / "train.log"
    script = (
        "import test_router as t\n"
        "from dlp_lora import Router\n"
        "texts, labels = t.make_texts(40, seed=5)\n"
        "Router.fit(texts, labels, t.make_tokenizer(), epochs=3, batch_size=4, verbose=True, **t.SMALL)\n"
    )
    with log.open("w") as stderr:
        subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parent, stderr=stderr,
                       stdout=subprocess.DEVNULL, check=True, timeout=300)
    text = log.read_text()
    assert "\r" not in text
    lines = text.splitlines()
    assert [line.split(",")[0] for line in lines] == [f"router: epoch {e}/3" for e in (1, 2, 3)], text
    assert all("steps, mean loss" in line for line in lines)


def test_train_is_module_train_and_fit_trains():
    """``train`` keeps nn.Module's meaning; training on data is the classmethod ``fit``."""
    router = Router(["a", "b"], **SMALL)
    assert router.eval() is router and not router.training
    assert router.train() is router and router.training
    assert Router.train is nn.Module.train and callable(Router.fit)


# ----------------------------------------------------------------------------- save / load


def test_save_load_round_trip(trained, tmp_path):
    trained.save(tmp_path / "router")
    saved = {p.name for p in (tmp_path / "router").iterdir()}
    assert saved >= {"router.safetensors", "router_config.json", "tokenizer"}
    loaded = Router.load(tmp_path / "router")
    assert loaded.label_names == trained.label_names and loaded.config == trained.config
    assert loaded.val_accuracy == trained.val_accuracy and not loaded.training
    ids = torch.randint(0, 120, (3, 9))
    torch.testing.assert_close(loaded(ids), trained(ids), rtol=0, atol=0)
    texts, _ = make_texts(5, seed=5)
    assert loaded.predict(texts) == trained.predict(texts)  # through the saved tokenizer


def test_load_errors(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Router.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="router_config.json"):
        Router.load(tmp_path / "empty")
    trained.save(tmp_path / "r")
    # weights of another architecture under this config
    Router(trained.label_names, **{**SMALL, "hidden": 32}).save(tmp_path / "other")
    other_weights = (tmp_path / "other" / "router.safetensors").read_bytes()
    (tmp_path / "r" / "router.safetensors").write_bytes(other_weights)
    with pytest.raises(ValueError, match="does not match"):
        Router.load(tmp_path / "r")


# ----------------------------------------------------------------------------- bad input


def test_empty_prompt_errors(trained):
    with pytest.raises(ValueError, match="empty prompt"):
        trained.route(torch.zeros(2, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="empty prompt"):
        trained(torch.tensor([[4, 5], [6, 7]]), torch.tensor([[1, 1], [0, 0]]))


@pytest.mark.parametrize("top_p, max_loras, arg",
                         [(0.0, None, "top_p"), (1.2, None, "top_p"), (0.5, 0, "max_loras")])
def test_route_rejects_bad_selection_args(trained, top_p, max_loras, arg):
    with pytest.raises(ValueError, match=arg):
        trained.route(torch.tensor([[4, 5]]), top_p=top_p, max_loras=max_loras)


def test_forward_rejects_bad_tensors(trained):
    with pytest.raises(ValueError, match="input_ids"):
        trained(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="input_ids"):
        trained(torch.tensor([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="attention_mask"):
        trained(torch.tensor([[1, 2]]), torch.ones(1, 3))


@pytest.mark.parametrize("texts, labels, match", [
    (["a b", "c d"], ["x"], "same length"),
    (["w1 w2", "w3"], ["x", "x"], "at least 2 distinct"),
    (["w1 w2", "  "], ["x", "y"], r"texts\[1\]"),
    ("w1 w2", ["x", "y"], "texts"),
    (["w1", "w2"], ["x", ""], r"labels\[1\]"),
])
def test_train_rejects_bad_data(tokenizer, texts, labels, match):
    with pytest.raises(ValueError, match=match):
        Router.fit(texts, labels, tokenizer, verbose=False, **SMALL)


def test_predict_without_tokenizer_errors():
    with pytest.raises(RuntimeError, match="tokenizer"):
        Router(["a", "b"], **SMALL).predict(["hello"])


@pytest.mark.parametrize("kwargs, arg", [({"num_buckets": 1}, "num_buckets"),
                                         ({"num_layers": 0}, "num_layers"), ({"dropout": 1.0}, "dropout")])
def test_bad_architecture(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        Router(["a", "b"], **kwargs)


def test_bad_label_names():
    with pytest.raises(ValueError, match="unique"):
        Router(["a", "a"])
    with pytest.raises(ValueError, match="label_names"):
        Router([])


# ----------------------------------------------------------------------------- damaged files


def _edit_config(directory, **changes):
    import json

    path = directory / "router_config.json"
    meta = json.loads(path.read_text())
    for key, value in changes.items():
        if key in meta.get("config", {}):
            meta["config"][key] = value
        else:
            meta[key] = value
    path.write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, match", [
    (lambda d: (d / "router.safetensors").write_bytes((d / "router.safetensors").read_bytes()[:100]),
     "router.safetensors"),
    (lambda d: (d / "router_config.json").write_text("[1, 2]"), "router_config.json"),
    (lambda d: (d / "router_config.json").write_bytes(b'{"format": "\xff"}'), "router_config.json"),
    (lambda d: _edit_config(d, format_version="1"), "format_version"),
    (lambda d: _edit_config(d, label_names="math"), "router_config.json.*label_names"),
    (lambda d: _edit_config(d, hidden=-3), "router_config.json.*hidden"),
    (lambda d: _edit_config(d, config=[1]), "router_config.json"),
])
def test_load_damaged_files_names_the_file(trained, tmp_path, damage, match):
    from dlp_lora.router.model import RouterLoadError

    trained.save(tmp_path / "r")
    damage(tmp_path / "r")
    with pytest.raises(RouterLoadError, match=match):
        Router.load(tmp_path / "r")


def test_load_refuses_non_float_and_non_finite_weights(trained, tmp_path):
    from safetensors.torch import load_file, save_file

    from dlp_lora.router.model import RouterLoadError

    trained.save(tmp_path / "r")
    path = tmp_path / "r" / "router.safetensors"
    state = load_file(str(path))
    key = next(k for k in state if k.endswith("weight") and "mlp" in k)
    save_file({**state, key: state[key].to(torch.int32)}, str(path))
    with pytest.raises(RouterLoadError, match=f"{key}.*floating"):
        Router.load(tmp_path / "r")
    bad = state[key].clone()
    bad[0, 0] = float("nan")
    save_file({**state, key: bad}, str(path))
    with pytest.raises(RouterLoadError, match=f"{key}.*non-finite"):
        Router.load(tmp_path / "r")


def test_load_checks_the_file_before_allocating(trained, tmp_path):
    """A config asking for 2^31-1 buckets (a 512 GB table) is refused against the file's shapes,
    without allocating: under a 6 GB address-space limit any attempt fails differently."""
    import subprocess
    import sys

    trained.save(tmp_path / "r")
    _edit_config(tmp_path / "r", num_buckets=2**31 - 1)
    script = (
        "import resource, sys\n"
        "resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))\n"
        "from dlp_lora.router import Router\n"
        "from dlp_lora.router.model import RouterLoadError\n"
        "try:\n"
        "    Router.load(sys.argv[1])\n"
        "except RouterLoadError as e:\n"
        "    print('refused:', e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "r")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.startswith("refused:"), proc.stderr[-2000:]
    assert "does not match" in proc.stdout and "embed.weight" in proc.stdout


# ----------------------------------------------------------------------------- atomic save


def test_failed_save_leaves_the_old_router(trained, tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    trained.save(tmp_path / "r")
    other = Router(["x", "y"], **SMALL)

    def full_disk(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(OSError, match="No space left") as info:
        other.save(tmp_path / "r")
    assert str(tmp_path / "r") in str(info.value)
    monkeypatch.undo()
    assert Router.load(tmp_path / "r").label_names == trained.label_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]  # no temporary directory left behind


def test_save_replaces_a_router_and_files_follow_the_umask(trained, tmp_path):
    import os

    trained.save(tmp_path / "r")
    (tmp_path / "r" / "stale.txt").write_text("from an older save")
    old_umask = os.umask(0o027)
    try:
        Router(["x", "y"], **SMALL).save(tmp_path / "r")
        Router(["x", "y"], **SMALL).save(tmp_path / "fresh")
    finally:
        os.umask(old_umask)
    assert Router.load(tmp_path / "r").label_names == ["x", "y"]
    assert not (tmp_path / "r" / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fresh", "r"]
    for name in ("router.safetensors", "router_config.json"):
        assert (tmp_path / "fresh" / name).stat().st_mode & 0o777 == 0o640, name
    assert (tmp_path / "fresh").stat().st_mode & 0o777 == 0o750
