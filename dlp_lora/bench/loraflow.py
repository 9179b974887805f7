"""LoRA-Flow-style fusion (layer-wise gates, token-level weights), a baseline DLP-LoRA is measured against.

LoRA-Flow (Wang et al., ACL 2024, arXiv 2402.11455; github.com/thunlp/LoRAFlow) gives every decoder
layer ``l`` one fusion gate. At every token ``t`` (prefill and decode) it reads the layer's input
hidden state and weights the layer's k LoRAs::

    w[l, t] = softmax(W_gate[l] h[l, t] / temperature) + b[l]               W_gate[l]: [k, hidden]
    y[t]    = W x[t] + sum_j  w[l, t, j] * scale[j] * B[j] A[j] x[t]      every adapted module of layer l

Only the gates train (``W_gate`` and ``b``, ~k * (hidden + 1) parameters per layer); the base model and
the LoRAs stay frozen.

What we followed, from the authors' code (``train/ModelCenter/model_center/layer/blocks.py`` for
training, ``UltraEval/lora-fusion/transformers/.../llama/modeling_llama.py`` and ``.../peft/tuners/
lora/layer.py`` for inference):

* gate input: the decoder layer's input ``hidden_states``, *before* its input RMSNorm (both files
  compute ``lora_fusion_gate(hidden_states)`` ahead of ``input_layernorm``), so here a forward pre-hook
  on the decoder layer reads its first argument;
* one gate ``Linear(hidden, k, bias=False)`` per layer, and one weight vector per token shared by
  every adapted module of that layer (q, k, v, o, gate, up, down);
* the bias ``b[l]`` is a learned per-layer, per-LoRA vector added *after* the softmax (their
  ``weight_bias``), so the weights need not sum to 1 nor be positive;
* temperature 1.0 (their evaluation uses 1.1 for two of six tasks);
* gate weight initialised to zeros (their ``Linear(..., cps=3)`` initialiser is ``zeros_``), so
  training starts from the uniform average 1/k;
* training: AdamW, betas (0.9, 0.95), eps 1e-5, lr 1e-3, a few epochs, batches of 4, loss on the
  answer tokens only (their hyper-parameters for most tasks).

Where we had to choose:

* the bias starts at zeros. The authors fuse exactly k=2 LoRAs (a language one and a task one) and
  start at ``[-0.5, 0.5]``, which favours the task LoRA; with k LoRAs of equal standing zeros is the
  neutral start (``bias_init`` takes their values for a 2-LoRA fusion);
* the gate's matmul runs in the model's dtype and the softmax in float32; the weights are float32;
* the benchmark's gates are random (normal, std 1/sqrt(hidden)): a speed baseline, where zero gates
  would give every token the same weights and hide nothing, but random ones make each token's
  weights differ, as a trained gate's do;
* the weights are kept per thread (``threading.local``), as DLP-LoRA's routing state is, so two
  callers of one patched model do not read each other's weights.

Two execution forms of the same sum:

``loop``  plain torch, a loop over the k LoRAs: two matmuls per LoRA over all tokens, each scaled by
          its column of weights (the authors stack the k deltas and matmul with the weights, which
          is the same arithmetic). Differentiable: gate training uses it.
``op``    our segmented op (``dlp_lora.ops.multi_lora``, ``validate=False``) with one segment per
          token: ``seg_indptr = arange(T+1)``, ``lora_ids`` = the k candidates on every row,
          ``lora_weights`` = gate weight * scaling (``baselines.apply_segmented_op``). Inference only.

``patch_loraflow(model, stacks, candidates=...)`` wraps the named ``nn.Linear`` modules in place and
hooks every decoder layer; ``unpatch_loraflow(model)`` restores the model. ``train_gates`` fits the
gates; ``save_gates`` / ``load_gates`` write and read them (safetensors + ``loraflow_gates.json``).
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import resolve_backend
from .baselines import LoRAStack, apply_segmented_op

__all__ = [
    "FORMS", "GateTraining", "LoRAFlowGate", "LoRAFlowLinear", "answer_loss", "apply_dense_loop",
    "apply_loraflow_op", "load_gates", "loraflow_gates", "patch_loraflow", "read_gates_config", "save_gates",
    "train_gates", "unpatch_loraflow",
]

FORMS = ("loop", "op")
GATES_FILE, CONFIG_FILE = "loraflow_gates.safetensors", "loraflow_gates.json"
_FORMAT = "dlp-lora loraflow gates v1"
# "model.layers.3.self_attn.q_proj" -> ("model.layers", 3): the decoder layer that owns a module
_LAYER_RE = re.compile(r"^(.*\blayers)\.(\d+)\.")


class LoRAFlowGate(nn.Module):
    """One decoder layer's fusion gate: ``softmax(h @ weight.T / temperature) + bias``.

    weight [k, hidden] in the model's dtype, bias [k] float32. The weights of the latest forward of
    this thread are kept for the layer's adapted modules (``current()``).
    """

    def __init__(self, hidden_size: int, k: int, *, temperature: float = 1.0, dtype=torch.float32,
                 device=None, bias_init: Sequence[float] | None = None):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"LoRAFlowGate: `temperature` must be > 0, got {temperature}")
        if bias_init is not None and len(bias_init) != k:
            raise ValueError(f"LoRAFlowGate: `bias_init` has {len(bias_init)} values for k={k} LoRAs")
        self.temperature = float(temperature)
        self.weight = nn.Parameter(torch.zeros(k, hidden_size, dtype=dtype, device=device))
        bias = torch.tensor(bias_init, dtype=torch.float32) if bias_init is not None else torch.zeros(k)
        self.bias = nn.Parameter(bias.to(device))
        self._state = threading.local()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states [..., hidden] -> weights [T, k] float32, T = the product of the leading dims."""
        logits = F.linear(hidden_states.reshape(-1, hidden_states.shape[-1]), self.weight)
        return F.softmax(logits.float() / self.temperature, dim=-1) + self.bias

    def set_current(self, hidden_states: torch.Tensor) -> None:
        self._state.weights = self(hidden_states)

    def current(self) -> torch.Tensor:
        weights = getattr(self._state, "weights", None)
        if weights is None:
            raise RuntimeError("LoRAFlowGate: no weights for this thread; the decoder layer's pre-hook "
                               "has not run (call the patched model, not a module of it)")
        return weights

    def extra_repr(self) -> str:
        k, hidden = self.weight.shape
        return f"hidden={hidden}, k={k}, temperature={self.temperature}"


def apply_dense_loop(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, candidates: Sequence[int],
                     weights: torch.Tensor) -> None:
    """In place: ``y[t] += sum_j weights[t, j] * scale[c_j] * B[c_j] A[c_j] x[t]``, one LoRA at a time.

    y [T, d_out], x [T, d_in] (same dtype), candidates: k adapter indices into the stack,
    weights [T, k] float32. Differentiable in ``weights`` (and x).
    """
    for j, idx in enumerate(candidates):
        coeff = (weights[:, j] * stack.scaling[idx]).to(x.dtype)[:, None]
        y.add_(F.linear(F.linear(x, stack.lora_a[idx]), stack.lora_b[idx]) * coeff)


def apply_loraflow_op(y: torch.Tensor, x: torch.Tensor, stack: LoRAStack, candidate_ids: torch.Tensor,
                      weights: torch.Tensor, *, backend: str | None = None) -> None:
    """In place, the same sum through dlp_lora.ops.multi_lora with one segment per token.

    candidate_ids [k] int32 on x's device; the other shapes as apply_dense_loop. Every row's slots
    hold all k candidates; the op reads lora_ids as a dense [T, k] array, hence the copy.
    """
    lora_ids = candidate_ids.expand(x.shape[0], -1).contiguous()
    apply_segmented_op(y, x, stack, lora_ids, weights, backend=backend)


class LoRAFlowLinear(nn.Module):
    """``base`` (an nn.Linear) plus the LoRA-Flow sum over the k candidates of a LoRAStack, weighted
    by its decoder layer's gate. Input [..., d_in], output [..., d_out]."""

    def __init__(self, base: nn.Linear, stack: LoRAStack, candidates: Sequence[int], gate: LoRAFlowGate,
                 *, form: str = "op", backend: str | None = None):
        super().__init__()
        n, r, d_in = stack.lora_a.shape
        if d_in != base.in_features or tuple(stack.lora_b.shape) != (n, base.out_features, r):
            raise ValueError(
                f"LoRAFlowLinear: `stack` has A {tuple(stack.lora_a.shape)}, B {tuple(stack.lora_b.shape)}; "
                f"expected [N, r, {base.in_features}] and [N, {base.out_features}, r] for this Linear")
        if not candidates or not all(0 <= c < n for c in candidates):
            raise ValueError(f"LoRAFlowLinear: `candidates` must be indices in [0, {n}), "
                             f"got {list(candidates)}")
        if len(candidates) != gate.weight.shape[0]:
            raise ValueError(f"LoRAFlowLinear: {len(candidates)} candidates for a gate over "
                             f"{gate.weight.shape[0]} LoRAs")
        self.base = base
        weight = base.weight
        self.stack = LoRAStack(stack.lora_a.to(weight), stack.lora_b.to(weight),
                               stack.scaling.to(device=weight.device, dtype=torch.float32))
        self.candidates = [int(c) for c in candidates]
        self._candidate_ids = torch.tensor(self.candidates, dtype=torch.int32, device=weight.device)
        # the gate belongs to the decoder layer (its submodule there); kept here unregistered, so the
        # state dict holds it once
        object.__setattr__(self, "_gate", gate)
        self._backend = backend
        self.set_form(form)

    def set_form(self, form: str) -> None:
        if form not in FORMS:
            raise ValueError(f"LoRAFlowLinear: `form` must be one of {FORMS}, got {form!r}")
        self.form = form
        if form == "op":
            # resolved once here, not on every token
            name = resolve_backend(self.base.weight.device, self._backend)
            self._apply = functools.partial(apply_loraflow_op, candidate_ids=self._candidate_ids,
                                            backend=name)
        else:
            self._apply = functools.partial(apply_dense_loop, candidates=self.candidates)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        flat_x = x.reshape(-1, x.shape[-1])
        flat_y = y.view(-1, y.shape[-1])
        weights = self._gate.current()
        if weights.shape[0] != flat_x.shape[0]:
            raise RuntimeError(f"LoRAFlowLinear: the layer's gate weighted {weights.shape[0]} tokens, this "
                               f"module got {flat_x.shape[0]}")
        self._apply(flat_y, flat_x, self.stack, weights=weights)
        return y

    def extra_repr(self) -> str:
        n, r, _ = self.stack.lora_a.shape
        return f"LoRA-Flow: form={self.form}, k={len(self.candidates)} of N={n}, r={r}"


@dataclass
class _Patch:
    originals: dict[str, nn.Module]
    gates: dict[int, LoRAFlowGate]
    layer_prefix: str
    hooks: list = field(default_factory=list)
    config: dict = field(default_factory=dict)


def _gate_pre_hook(gate: LoRAFlowGate, module, args, kwargs):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    gate.set_current(hidden_states)


def patch_loraflow(model: nn.Module, stacks: Mapping[str, LoRAStack], *,
                   candidates: Sequence[int] | None = None, names: Sequence[str] | None = None,
                   form: str = "op", temperature: float = 1.0,
                   init: str = "zeros", bias_init: Sequence[float] | None = None, seed: int = 0,
                   backend: str | None = None) -> nn.Module:
    """Give every decoder layer a LoRA-Flow gate over ``candidates`` and wrap every ``nn.Linear``
    named in ``stacks`` (keys as in model.named_modules()) in a LoRAFlowLinear; in place, returns model.

    candidates: the k adapter indices (into every stack) the gates fuse, default all N; names: their
    names, recorded with saved gates. init: "zeros" (the authors' start: uniform weights) or "normal"
    (std 1/sqrt(hidden), drawn from ``seed``: a benchmark's random gates). Everything is checked and
    built first, so a bad argument leaves the model as it was. The gates become submodules
    ``<layers>.<i>.lora_flow_gate`` (parameters with requires_grad True; the rest is left as it was).
    """
    if getattr(model, "_loraflow", None) is not None:
        raise RuntimeError("patch_loraflow: `model` is already patched; call unpatch_loraflow first")
    if not stacks:
        raise ValueError("patch_loraflow: `stacks` is empty")
    if init not in ("zeros", "normal"):
        raise ValueError(f"patch_loraflow: `init` must be 'zeros' or 'normal', got {init!r}")
    n = next(iter(stacks.values())).lora_a.shape[0]
    candidates = list(range(n)) if candidates is None else [int(c) for c in candidates]
    if names is not None and len(names) != len(candidates):
        raise ValueError(f"patch_loraflow: {len(names)} names for {len(candidates)} candidates")
    modules = dict(model.named_modules())
    layer_of, prefixes = {}, set()
    for name in stacks:
        base = modules.get(name)
        if not isinstance(base, nn.Linear):
            found = type(base).__name__ if base is not None else "nothing"
            raise ValueError(f"patch_loraflow: `stacks` names {name!r}, which is not an nn.Linear of "
                             f"the model (found {found})")
        match = _LAYER_RE.match(name)
        if match is None:
            raise ValueError(f"patch_loraflow: {name!r} is not inside a decoder layer (<...>.layers.<i>.)")
        prefixes.add(match.group(1))
        layer_of[name] = int(match.group(2))
    if len(prefixes) != 1:
        raise ValueError(f"patch_loraflow: the modules sit in several layer lists {sorted(prefixes)}")
    prefix = prefixes.pop()
    hidden = model.config.hidden_size
    ref = modules[next(iter(stacks))].weight
    generator = torch.Generator().manual_seed(seed)
    gates = {}
    for i in sorted(set(layer_of.values())):
        gate = LoRAFlowGate(hidden, len(candidates), temperature=temperature, dtype=ref.dtype,
                            device=ref.device, bias_init=bias_init)
        if init == "normal":
            with torch.no_grad():
                gate.weight.copy_(torch.randn(gate.weight.shape, generator=generator) / math.sqrt(hidden))
        gates[i] = gate
    wrapped = {name: LoRAFlowLinear(modules[name], stack, candidates, gates[layer_of[name]], form=form,
                                    backend=backend)
               for name, stack in stacks.items()}

    originals = {}
    for name, module in wrapped.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        originals[name] = getattr(parent, child)
        setattr(parent, child, module)
    patch = _Patch(originals, gates, prefix, config={
        "format": _FORMAT, "hidden_size": hidden, "k": len(candidates), "layers": sorted(gates),
        "candidates": candidates, "names": list(names) if names is not None else None,
        "temperature": float(temperature)})
    for i, gate in gates.items():
        layer = model.get_submodule(f"{prefix}.{i}")
        layer.lora_flow_gate = gate
        patch.hooks.append(layer.register_forward_pre_hook(functools.partial(_gate_pre_hook, gate),
                                                           with_kwargs=True))
    model._loraflow = patch
    return model


def unpatch_loraflow(model: nn.Module) -> nn.Module:
    """Remove the gates and hooks and put back the Linear modules replaced by patch_loraflow."""
    patch = getattr(model, "_loraflow", None)
    if patch is None:
        raise RuntimeError("unpatch_loraflow: `model` is not patched")
    for hook in patch.hooks:
        hook.remove()
    for i in patch.gates:
        del model.get_submodule(f"{patch.layer_prefix}.{i}").lora_flow_gate
    for name, module in patch.originals.items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module)
    del model._loraflow
    return model


def _patch_of(model: nn.Module, caller: str) -> _Patch:
    patch = getattr(model, "_loraflow", None)
    if patch is None:
        raise RuntimeError(f"{caller}: `model` is not patched with patch_loraflow")
    return patch


def loraflow_gates(model: nn.Module) -> dict[int, LoRAFlowGate]:
    """Decoder layer index -> its gate, for a model patched by patch_loraflow."""
    return dict(_patch_of(model, "loraflow_gates").gates)


@contextlib.contextmanager
def _form(model: nn.Module, form: str) -> Iterator[None]:
    linears = [m for m in model.modules() if isinstance(m, LoRAFlowLinear)]
    before = [m.form for m in linears]
    for m in linears:
        m.set_form(form)
    try:
        yield
    finally:
        for m, f in zip(linears, before, strict=True):
            m.set_form(f)


# ----------------------------------------------------------------------------- training


@dataclass
class GateTraining:
    """What train_gates did: the mean loss of each epoch, steps, examples, seconds."""

    epoch_losses: list[float]
    steps: int
    examples: int
    seconds: float
    dev_losses: list[float] = field(default_factory=list)  # answer loss on the dev split after each epoch
    best_epoch: int | None = None  # 1-based epoch whose gates were kept (with a dev split)


def _batch(examples: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int, device):
    """Right-padded input_ids, attention_mask and labels (-100 except on the answer tokens)."""
    length = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (prompt, answer) in enumerate(examples):
        seq = list(prompt) + list(answer)
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        labels[row, len(prompt):len(seq)] = torch.tensor(list(answer))
    return ids.to(device), mask.to(device), labels.to(device)


def answer_loss(model: nn.Module, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                pad_id: int = 0, batch_size: int = 16) -> float:
    """Mean cross-entropy over the answer tokens of ``examples`` = [(prompt ids, answer ids)]."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            ids, mask, labels = _batch(examples[i:i + batch_size], pad_id, device)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                     ignore_index=-100, reduction="sum").item()
            count += int((target != -100).sum())
    return total / max(1, count)


def train_gates(model: nn.Module, examples: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                epochs: int = 5, lr: float = 1e-3, batch_size: int = 4, weight_decay: float = 0.0,
                pad_id: int = 0, seed: int = 0, max_seconds: float | None = None,
                warmup_ratio: float | None = None, clip: float | None = None,
                dev: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
                log: Callable[[str], None] | None = None) -> GateTraining:
    """Fit the LoRA-Flow gates of a patched model; everything else stays frozen.

    examples: [(prompt token ids, answer token ids)]; the loss is the cross-entropy of the answer
    tokens given everything before them (right padding, masked). AdamW (betas 0.9/0.95, eps 1e-5,
    the authors' settings), shuffled each epoch with ``seed``. Runs the loop form (the op has no
    backward) and puts the modules' form back afterwards. max_seconds: stop after the step that
    passes it. The authors' full recipe adds: warmup_ratio (linear warm-up over that share of the
    steps, then cosine decay to 0), clip (gradient norm clipping) and dev (the gates of the epoch
    with the lowest dev answer loss are kept).
    """
    patch = _patch_of(model, "train_gates")
    if not examples:
        raise ValueError("train_gates: `examples` is empty")
    params = [p for gate in patch.gates.values() for p in gate.parameters()]
    frozen = {p: p.requires_grad for p in model.parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=weight_decay)
    scheduler = None
    if warmup_ratio is not None:
        total = epochs * math.ceil(len(examples) / batch_size)
        warmup = max(1, round(warmup_ratio * total))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: (s + 1) / warmup if s < warmup else
                                                      0.5 * (1 + math.cos(math.pi * (s - warmup)
                                                                          / max(1, total - warmup))))
    best, dev_losses = None, []
    device = params[0].device
    order = list(range(len(examples)))
    rng = random.Random(seed)
    start, steps, losses = time.perf_counter(), 0, []
    was_training = model.training
    model.eval()  # no dropout: the gates are the only thing that changes
    try:
        with _form(model, "loop"), torch.enable_grad():
            for epoch in range(epochs):
                rng.shuffle(order)
                epoch_loss, batches = 0.0, 0
                for i in range(0, len(order), batch_size):
                    ids, mask, labels = _batch([examples[j] for j in order[i:i + batch_size]], pad_id, device)
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, clip)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    epoch_loss, batches, steps = epoch_loss + loss.item(), batches + 1, steps + 1
                    if max_seconds is not None and time.perf_counter() - start > max_seconds:
                        break
                losses.append(epoch_loss / batches)
                if dev:
                    dev_losses.append(answer_loss(model, dev, pad_id=pad_id, batch_size=batch_size))
                    if best is None or dev_losses[-1] < best[1]:
                        best = (epoch + 1, dev_losses[-1], [p.detach().clone() for p in params])
                if log is not None:
                    dev_note = f", dev loss {dev_losses[-1]:.4f}" if dev else ""
                    log(f"gate epoch {epoch + 1}: loss {losses[-1]:.4f}{dev_note}")
                if max_seconds is not None and time.perf_counter() - start > max_seconds:
                    break
    finally:
        for p, flag in frozen.items():
            p.requires_grad_(flag)
        model.train(was_training)
    if best is not None:
        with torch.no_grad():
            for p, kept in zip(params, best[2], strict=True):
                p.copy_(kept)
    return GateTraining(losses, steps, len(examples), time.perf_counter() - start, dev_losses,
                        best[0] if best is not None else None)


# ----------------------------------------------------------------------------- save / load


def save_gates(model: nn.Module, directory: str | Path) -> Path:
    """Write the gates of a patched model: ``loraflow_gates.safetensors`` (``layers.<i>.weight``
    [k, hidden], ``layers.<i>.bias`` [k]) and ``loraflow_gates.json`` (k, hidden, layers, candidates,
    names, temperature). Returns the directory."""
    from safetensors.torch import save_file

    patch = _patch_of(model, "save_gates")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, gate in patch.gates.items():
        tensors[f"layers.{i}.weight"] = gate.weight.detach().cpu().contiguous()
        tensors[f"layers.{i}.bias"] = gate.bias.detach().cpu().contiguous()
    save_file(tensors, str(directory / GATES_FILE))
    (directory / CONFIG_FILE).write_text(json.dumps(patch.config, indent=1) + "\n")
    return directory


def read_gates_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"load_gates: {path} is missing")
    config = json.loads(path.read_text())
    if config.get("format") != _FORMAT:
        raise ValueError(f"load_gates: {path} is not a {_FORMAT!r} file (format {config.get('format')!r})")
    return config


def load_gates(model: nn.Module, directory: str | Path) -> nn.Module:
    """Copy saved gates into a model patched with the same k, hidden size, layers and candidates
    (and names, when both record them); the temperature is taken from the file. Returns model."""
    from safetensors.torch import load_file

    patch = _patch_of(model, "load_gates")
    config = read_gates_config(directory)
    for key in ("hidden_size", "k", "layers", "candidates"):
        if config[key] != patch.config[key]:
            raise ValueError(f"load_gates: the saved gates have {key}={config[key]}, the model's "
                             f"{patch.config[key]}")
    if config.get("names") and patch.config.get("names") and config["names"] != patch.config["names"]:
        raise ValueError(f"load_gates: the saved gates fuse {config['names']}, "
                         f"the model's {patch.config['names']}")
    tensors = load_file(str(Path(directory) / GATES_FILE))
    with torch.no_grad():
        for i, gate in patch.gates.items():
            gate.weight.copy_(tensors[f"layers.{i}.weight"])
            gate.bias.copy_(tensors[f"layers.{i}.bias"])
            gate.temperature = float(config["temperature"])
    patch.config["temperature"] = float(config["temperature"])
    return model

