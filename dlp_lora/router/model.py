"""The DLP-LoRA router: a mini-MLP that reads the base model's own token ids and scores adapters.

The paper's router is a 4-layer MLP of about 5M parameters. To run inside the model's
forward on ``input_ids`` without a second tokenizer, it featurises the base model's token
ids directly: every token (unigram) and every adjacent pair (bigram) is hashed into one of
``num_buckets`` buckets, an ``nn.EmbeddingBag`` averages the unigrams' and the bigrams' vectors
over the sequence (two bags, concatenated), and the MLP maps that to logits over the adapter
(label) names.
Padding is excluded through ``attention_mask``, so left or right padding gives the same result.

    router = Router.fit(texts, labels, tokenizer)      # prints held-out accuracy
    router.save("router/"); router = Router.load("router/")
    lora_ids, weights = router.route(input_ids, attention_mask, top_p=0.6)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .._atomic import atomic_directory
from ..options import DEFAULT_TOP_P
from .inputs import _check_label_names, _check_texts, _encode
from .top_p import check_max_loras, check_top_p, route_top_p
from .training import train_router

__all__ = ["Router", "RouterLoadError", "hashed_features"]

WEIGHTS_NAME = "router.safetensors"
CONFIG_NAME = "router_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT = "dlp-lora-router"
FORMAT_VERSION = 1
# Saved routers are only valid with the hash they were trained with: bump this if it changes.
HASHING = "separate unigram and bigram bags, mod (2^31-1), v2"

# Hashing constants. Python's hash() is salted per process, so buckets come from fixed
# arithmetic instead. Every operand is reduced mod the Mersenne prime 2^31-1 and every
# multiplier is a prime below 2^31, so no int64 product can overflow (< 2^62), and the
# result is identical on every device. Reducing mod a prime mixes high and low bits before
# the final mod num_buckets (a power of two would otherwise see only the low bits).
_MOD = 2**31 - 1
_UNI_MUL = 1_000_000_007
_BI_PREV_MUL = 1_000_003
_BI_MUL = 998_244_353
_BI_ADD = 754_974_721


def hashed_features(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, num_buckets: int
) -> torch.Tensor:
    """Hash unigrams and bigrams of token ids into embedding-bag buckets.

    Args:
        input_ids: [B, L] integer token ids of the base model.
        attention_mask: [B, L] (1 = token, 0 = padding) or None (no padding).
        num_buckets: buckets in [0, num_buckets); ``num_buckets`` itself marks "no feature".

    Returns:
        [B, 2, L] int64: ``[:, 0, t]`` the bucket of token t, ``[:, 1, t]`` the bucket of the
        bigram (token t-1, token t); ``num_buckets`` where the token (or either token of the pair)
        is masked, and at ``[:, 1, 0]``. The set of buckets of a row does not depend on where its
        padding sits.
    """
    ids = input_ids.long() % _MOD
    valid = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    unigrams = (ids * _UNI_MUL) % _MOD % num_buckets
    unigrams = unigrams.masked_fill(~valid, num_buckets)
    pair = (ids[:, :-1] * _BI_PREV_MUL + ids[:, 1:]) % _MOD
    bigrams = (pair * _BI_MUL + _BI_ADD) % _MOD % num_buckets
    bigrams = bigrams.masked_fill(~(valid[:, :-1] & valid[:, 1:]), num_buckets)
    bigrams = torch.cat([torch.full_like(ids[:, :1], num_buckets), bigrams], dim=1)[:, : ids.shape[1]]
    return torch.stack([unigrams, bigrams], dim=1)


_ARCH_ARGS = ("num_buckets", "embed_dim", "hidden", "num_layers", "dropout")
# Upper bounds of the sizes, checked before any module is built: a damaged or hostile config must not
# make Router.load build a million layers (Python objects, even on the meta device) before refusing.
# Far above any useful router (the paper's has 4 layers; the defaults are 2^16 buckets, 64, 256).
_ARCH_BOUNDS = {"num_buckets": (2, _MOD), "embed_dim": (1, 1 << 16), "hidden": (1, 1 << 16),
                "num_layers": (1, 64)}


def _check_arch(num_buckets, embed_dim, hidden, num_layers, dropout) -> dict:
    values = {"num_buckets": num_buckets, "embed_dim": embed_dim, "hidden": hidden, "num_layers": num_layers}
    for name, value in values.items():
        low, high = _ARCH_BOUNDS[name]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            shown = repr(value) if len(repr(value)) < 40 else repr(value)[:37] + "..."
            raise ValueError(f"{name} must be an integer in [{low}, {high}], got {shown}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    return dict(num_buckets=num_buckets, embed_dim=embed_dim, hidden=hidden, num_layers=num_layers,
                dropout=float(dropout))


class RouterLoadError(ValueError):
    """A saved router cannot be loaded (the message names the file)."""


class Router(nn.Module):
    """Mini-MLP router over hashed unigram+bigram features of the base model's token ids.

    Args:
        label_names: adapter names, one per output logit (order = logit index).
        num_buckets: hash buckets of the embedding bag (default 2**16).
        embed_dim: embedding width (default 64).
        hidden: MLP width (default 256).
        num_layers: Linear layers in the MLP (default 4, as in the paper).
        dropout: dropout between MLP layers during training.

    The default architecture has about 4.4M parameters for 26 labels (4.2M in the embedding bag).

    Attributes:
        label_names: list[str]; config: dict (the arch arguments); tokenizer: the tokenizer it
        was trained with (saved with it) or None; val_accuracy: held-out accuracy or None.
    """

    def __init__(self, label_names: Sequence[str], *, num_buckets: int = 2**16, embed_dim: int = 64,
                 hidden: int = 256, num_layers: int = 4, dropout: float = 0.1):
        super().__init__()
        self.label_names = _check_label_names(label_names)
        self.config = _check_arch(num_buckets, embed_dim, hidden, num_layers, dropout)
        self.tokenizer = None
        self.val_accuracy: float | None = None
        # bucket num_buckets is the "no feature" slot: excluded from the mean
        self.embed = nn.EmbeddingBag(num_buckets + 1, embed_dim, mode="mean", padding_idx=num_buckets)
        # Small initial vectors (fastText's choice): at inference most bigrams of a new sentence
        # were never seen in training, and their untrained vectors must add next to nothing to the
        # mean. With the default N(0, 1) they drowned the learned features (held-out accuracy fell
        # from ~100% to ~80% on separable tasks). For the same reason there is no LayerNorm on the
        # mean: it would scale that small noise back up.
        nn.init.uniform_(self.embed.weight, -1.0 / embed_dim, 1.0 / embed_dim)
        with torch.no_grad():
            self.embed.weight[num_buckets].zero_()
        widths = [2 * embed_dim] + [hidden] * (num_layers - 1) + [len(self.label_names)]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            if i:
                layers += [nn.GELU(), nn.Dropout(dropout)]
            layers.append(nn.Linear(w_in, w_out))
        self.mlp = nn.Sequential(*layers)

    def extra_repr(self) -> str:
        return f"labels={self.label_names}"

    @property
    def num_buckets(self) -> int:
        return self.config["num_buckets"]

    # ------------------------------------------------------------------ inference

    def features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[B, L] token ids (+ mask) -> [B, 2, L] int64 bucket ids (see :func:`hashed_features`)."""
        return hashed_features(input_ids, attention_mask, self.num_buckets)

    def forward_features(self, bags: torch.Tensor) -> torch.Tensor:
        """[B, 2, F] int64 buckets (unigram bag, bigram bag; ``num_buckets`` = none) -> [B, N] float32 logits.

        Unigrams and bigrams are averaged separately and concatenated: one mean over both would
        dilute the (mostly known) unigrams with the (mostly unseen) bigrams of a new sentence.
        """
        B, two, F = bags.shape
        pooled = self.embed(bags.to(self.embed.weight.device).reshape(B * two, F)).reshape(B, -1)
        return self.mlp(pooled).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over ``label_names``.

        Args:
            input_ids: [B, L] integer token ids of the base model (any device).
            attention_mask: [B, L] (1 = token, 0 = padding) or None.
        Returns:
            logits [B, N] float32 on the router's device.
        Raises:
            ValueError: bad shapes/dtypes, or an empty prompt (L == 0 or a row with no token).
        """
        self._check_inputs(input_ids, attention_mask)
        device = self.embed.weight.device
        mask = None if attention_mask is None else attention_mask.to(device)
        return self.forward_features(self.features(input_ids.to(device), mask))

    def probs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Softmax of :meth:`forward`: [B, N] float32."""
        return torch.softmax(self(input_ids, attention_mask), dim=-1)

    @torch.no_grad()
    def route(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              top_p: float = DEFAULT_TOP_P,
              max_loras: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Adapters for each sequence: top-p over the router's softmax (see ``route_top_p``).

        Returns lora_ids [B, K] int32 (-1 = empty slot) and weights [B, K] float32 (sum 1 per
        row), on ``input_ids``' device. Runs in eval mode without autograd.
        """
        check_top_p(top_p)
        check_max_loras(max_loras)
        with self._eval_mode():
            probs = self.probs(input_ids, attention_mask)
        lora_ids, weights = route_top_p(probs, top_p, max_loras)
        return lora_ids.to(input_ids.device), weights.to(input_ids.device)

    @torch.no_grad()
    def predict(self, texts: Sequence[str], batch_size: int = 1024) -> list[str]:
        """The most likely label name for each text, tokenised with the stored tokenizer."""
        if self.tokenizer is None:
            raise RuntimeError("this router has no tokenizer: train it with Router.fit(..., tokenizer) "
                               "or load one saved with its tokenizer, or set router.tokenizer")
        texts = _check_texts(texts)
        out: list[str] = []
        with self._eval_mode():
            for i in range(0, len(texts), batch_size):
                ids, mask = _encode(self.tokenizer, texts[i:i + batch_size])
                self._check_inputs(ids, mask, arg_offset=i)
                out += [self.label_names[j] for j in self(ids, mask).argmax(dim=-1).tolist()]
        return out

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.training
        self.eval()
        try:
            yield
        finally:
            nn.Module.train(self, was_training)

    @staticmethod
    def _check_inputs(input_ids, attention_mask, arg_offset: int = 0) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be a [B, L] tensor, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a [B, L] tensor, got shape {tuple(input_ids.shape)}")
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got {input_ids.dtype}")
        mask = attention_mask
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.shape != input_ids.shape):
            got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {got}")
        if input_ids.shape[1] == 0:
            raise ValueError("empty prompt: input_ids has no tokens (L == 0); the router needs at least one")
        if attention_mask is not None:
            empty = (attention_mask == 0).all(dim=1)
            if bool(empty.any()):
                rows = [i + arg_offset for i in empty.nonzero().flatten().tolist()]
                raise ValueError(f"empty prompt: attention_mask selects no token in row(s) {rows[:10]}")

    # ------------------------------------------------------------------ training

    @classmethod
    def fit(cls, texts: Sequence[str], labels: Sequence[str], tokenizer, **options) -> Router:
        """Train a router on (text, label) pairs; see :func:`dlp_lora.router.training.train_router`."""
        return train_router(cls, texts, labels, tokenizer, **options)

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> Path:
        """Write router.safetensors, router_config.json and (if present) tokenizer/ to ``directory``.

        All or nothing: the files are written beside ``directory`` and renamed into place together
        (see dlp_lora/_atomic.py), so a failure (a full disk, say) leaves the previous router there.
        Raises OSError naming ``directory``.
        """
        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        meta = dict(format=FORMAT, format_version=FORMAT_VERSION, hashing=HASHING, config=self.config,
                    label_names=self.label_names, val_accuracy=self.val_accuracy)
        try:
            with atomic_directory(directory) as tmp:
                save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT})
                (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
                if self.tokenizer is not None:
                    self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
        except (OSError, SafetensorError) as e:  # safetensors' I/O errors are not OSErrors
            reason = getattr(e, "strerror", None) or str(e)
            raise OSError(f"cannot save the router to {directory}: {reason}") from e
        return directory

    @classmethod
    def load(cls, directory: str | Path, device=None) -> Router:
        """Load a router written by :meth:`save` (in eval mode, on ``device`` or CPU).

        The config is checked against the shapes in the weights file's header before anything is
        allocated, so a damaged config cannot ask for a huge embedding table.
        Raises FileNotFoundError (no router there) or RouterLoadError naming the bad file.
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"router directory not found: {directory}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} is not a saved router: {name} is missing")
        meta = _read_config(directory / CONFIG_NAME)
        config_file, weights_file = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        try:
            with torch.device("meta"):  # shapes only: nothing is allocated until the file agrees
                skeleton = cls(meta["label_names"], **meta["config"])
        except ValueError as e:
            raise RouterLoadError(f"{config_file}: {e}") from None
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        try:
            with safe_open(str(weights_file), framework="pt") as f:
                found = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
                if expected != found:
                    diff = sorted(f"{k}: config expects {expected.get(k)}, file has {found.get(k)}"
                                  for k in expected.keys() | found.keys() if expected.get(k) != found.get(k))
                    raise RouterLoadError(f"{weights_file} does not match {CONFIG_NAME}: "
                                          + "; ".join(diff[:5]))
                state = {k: f.get_tensor(k) for k in f.keys()}
        except SafetensorError as e:
            raise RouterLoadError(f"{weights_file} is not a readable safetensors file ({e})") from None
        for key, tensor in state.items():
            if not tensor.is_floating_point():
                raise RouterLoadError(f"{weights_file}: {key} must be a floating tensor, got {tensor.dtype}")
            if not bool(torch.isfinite(tensor).all()):
                raise RouterLoadError(f"{weights_file}: {key} holds non-finite values (NaN or inf)")
        router = skeleton
        # the file's tensors replace the meta ones, in the dtype the model is built with
        dtypes = {k: v.dtype for k, v in skeleton.state_dict().items()}
        router.load_state_dict({k: v.to(dtypes[k]) for k, v in state.items()}, assign=True)
        router.val_accuracy = meta.get("val_accuracy")
        if (directory / TOKENIZER_DIR).is_dir():
            from transformers import AutoTokenizer

            try:
                router.tokenizer = AutoTokenizer.from_pretrained(str(directory / TOKENIZER_DIR))
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise RouterLoadError(f"{directory / TOKENIZER_DIR}: the saved tokenizer cannot be loaded "
                                      f"({e})") from None
        return router.to(device or "cpu").eval()


def _read_config(path: Path) -> dict:
    """router_config.json as a dict, checked field by field (every refusal names the file)."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise RouterLoadError(f"{path} is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise RouterLoadError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RouterLoadError(f"{path} is not a dlp-lora router config")
    version = meta.get("format_version", 0)
    if isinstance(version, bool) or not isinstance(version, int):
        raise RouterLoadError(f"{path}: format_version must be an integer, got {version!r}")
    if version > FORMAT_VERSION or meta.get("hashing") != HASHING:
        raise RouterLoadError(f"{path.parent} was saved by an incompatible dlp-lora (format_version="
                              f"{version}, hashing={meta.get('hashing')!r}); this version reads "
                              f"format_version<={FORMAT_VERSION}, hashing={HASHING!r}")
    if not isinstance(meta.get("config"), dict) or "label_names" not in meta:
        raise RouterLoadError(f"{path} is incomplete or malformed: it needs a 'config' object and "
                              "'label_names'")
    unknown = sorted(set(meta["config"]) - set(_ARCH_ARGS))
    if unknown:
        raise RouterLoadError(f"{path}: unknown config fields {unknown}")
    accuracy = meta.get("val_accuracy")
    if accuracy is not None and (isinstance(accuracy, bool) or not isinstance(accuracy, (int, float))):
        raise RouterLoadError(f"{path}: val_accuracy must be a number or null, got {accuracy!r}")
    return meta
