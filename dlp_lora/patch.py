"""patch_model / unpatch_model / use_mixture: DLP-LoRA on a live Hugging Face model.

    model = patch_model(model, bank, router, top_p=0.6)       # in place; returns model
    model.generate(input_ids, attention_mask=mask)             # each sequence gets its own mixture
    with use_mixture(model, [{"math": 0.7, "de_en": 0.3}, {"code": 1.0}]):  # bypass the router
        logits = model(input_ids).logits
    unpatch_model(model)                                       # bit-identical to before

How a module is patched. Each targeted nn.Linear (or transformers Conv1D) keeps its identity and
parameters: only its class is swapped for a subclass (``DLPLoRALinear``, ``DLPLoRAConv1D``) whose
forward runs the original forward, then adds the LoRA delta in place with the multi-LoRA op. The
stacked adapters are registered as non-persistent buffers (``dlp_lora_a``, ``dlp_lora_b``), so
``state_dict()`` never changes, ``model.to()`` / ``.half()`` move and cast them with the model,
and ``print(model)`` shows the patched class. No forward hook runs per module: the only per-forward
work outside the op is one pre-forward hook on the top-level model, which routes (see
dlp_lora/generation.py) and validates the routing tensors once for all modules.

Inference only: the delta is added without autograd (gradients do not flow through the LoRAs).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from . import ops
from .artifacts import label_mismatch
from .bank import LoRABank
from .mixture import Mixture, MixtureError
from .options import DEFAULT_REROUTE, DEFAULT_TOP_P
from .router.top_p import check_max_loras, check_top_p
from .routing_state import (
    REROUTE_MODES,
    Route,
    RoutingRecord,
    RoutingState,
    RowSpec,
    SequenceRouting,
)
from .sentences import SentenceRule

__all__ = ["patch_model", "unpatch_model", "use_mixture", "is_patched", "PatchError"]

BUFFER_A, BUFFER_B, STATE_ATTR = "dlp_lora_a", "dlp_lora_b", "dlp_routing"
MASK_ATTR = "dlp_lora_adapters"  # bit i set when adapter i targets the module (see RoutingState.adapters)
HANDLE_ATTR, LOG_ATTR = "_dlp_lora_patch", "dlp_routing_log"


class PatchError(ValueError):
    """patch_model / unpatch_model refused; the model is left exactly as it was."""


@dataclass
class _PatchHandle:
    bank: LoRABank
    router: object
    routing: SequenceRouting
    module_names: list[str]
    hook: torch.utils.hooks.RemovableHandle


# --- the patched module --------------------------------------------------------------------------


def _add_lora_delta(module: nn.Module, state: RoutingState, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """y [..., d_out] += the routed LoRA delta of x [..., d_in]; returns y (a new tensor on the slow path).

    The hot path of every patched module: two views and the op, unvalidated (the routing tensors
    were checked once for the whole forward) and without allocation.
    """
    buffers = module._buffers  # the dict itself: nn.Module.__getattr__ costs ~1 us per lookup
    lora_a, lora_b = buffers[BUFFER_A], buffers[BUFFER_B]
    x2 = x.reshape(-1, lora_a.shape[2])
    rows = x2.shape[0]
    if rows == state.num_tokens:
        seg_indptr, lora_ids, lora_weights = state.seg_indptr, state.lora_ids, state.lora_weights
    elif rows == state.num_sequences:  # one row per sequence, e.g. lm_head with logits_to_keep=1
        seg_indptr, lora_ids = state.last_seg_indptr, state.last_lora_ids
        lora_weights = state.last_lora_weights
    else:
        raise RuntimeError(
            f"dlp-lora: a patched module got {rows} rows, but the routed forward has "
            f"{state.num_tokens} tokens in {state.num_sequences} sequences"
        )
    if (state.fast or torch.compiler.is_compiling()) and not y.requires_grad and (
        x2.dtype == y.dtype == lora_a.dtype
    ):
        # In place (functionalised by the compiler when traced).
        ops.multi_lora(y.view(rows, -1), x2.contiguous(), lora_a, lora_b, seg_indptr, lora_ids, lora_weights,
                       backend=state.backend, validate=False)
        return y
    # Autograd on, or autocast: compute the delta aside (no autograd through it), add it out of place.
    delta = torch.zeros(rows, lora_b.shape[1], dtype=lora_a.dtype, device=y.device)
    ops.multi_lora(delta, x2.detach().to(lora_a.dtype).contiguous(), lora_a, lora_b, seg_indptr, lora_ids,
                   lora_weights, backend=state.backend, validate=False)
    return y + delta.view(y.shape).to(y.dtype)


_PATCHED_CLASSES: dict[type, type] = {}


def _new_patched(base_cls: type) -> nn.Module:
    """An empty instance of the patched class of ``base_cls``, for unpickling (state comes after)."""
    return object.__new__(_patched_class(base_cls))


def _patched_class(base_cls: type) -> type:
    """``DLPLoRA<base>``: base_cls whose forward adds the routed LoRA delta (one class per base)."""
    cls = _PATCHED_CLASSES.get(base_cls)
    if cls is not None:
        return cls
    base_forward = base_cls.forward

    def forward(self, x):
        y = base_forward(self, x)
        state = self.dlp_routing.call.state  # this thread's routing (see dlp_lora.routing_state)
        # Eager: skip the op when no adapter of this step targets the module (its delta is exactly
        # zero). Compiled: always call it, so the graph guards on no mixture (no recompiles).
        if state is not None and state.active and (
            torch.compiler.is_compiling() or self.dlp_lora_adapters & state.adapters
        ):
            y = _add_lora_delta(self, state, x, y)
        return y

    def __reduce_ex__(self, protocol):
        # Pickle by the base class, which pickle can find by name; the patched class is rebuilt.
        _, _, *rest = base_cls.__reduce_ex__(self, protocol)
        return (_new_patched, (base_cls,), *rest)

    def describe(self) -> str:
        return f"dlp_lora=(loras={self.dlp_lora_a.shape[0]}, r_max={self.dlp_lora_a.shape[1]})"

    def extra_repr(self) -> str:
        base = base_cls.extra_repr(self)
        return f"{base}, {describe(self)}" if base else describe(self)

    name = f"DLPLoRA{base_cls.__name__}"
    namespace = {
        "forward": forward,
        "__reduce_ex__": __reduce_ex__,
        "extra_repr": extra_repr,
        "_dlp_base_class": base_cls,
        "__module__": __name__,
        "__doc__": f"{base_cls.__name__} plus the routed DLP-LoRA delta (see dlp_lora.patch).",
    }
    if base_cls.__repr__ is not nn.Module.__repr__:  # e.g. transformers' Conv1D prints itself
        namespace["__repr__"] = lambda self: f"{name}({base_cls.__repr__(self)}, {describe(self)})"
    cls = type(name, (base_cls,), namespace)
    _PATCHED_CLASSES[base_cls] = cls
    return cls


def _in_out_features(module: nn.Module) -> tuple[int, int] | None:
    """(d_in, d_out) of a patchable module, None for anything else."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    if isinstance(module, Conv1D):  # GPT-2: weight [d_in, d_out] (fan_in_fan_out); LoRA keeps Linear shapes
        return module.weight.shape[0], module.weight.shape[1]
    return None


# --- patch / unpatch -----------------------------------------------------------------------------


def is_patched(model: nn.Module) -> bool:
    return hasattr(model, HANDLE_ATTR)


def patch_model(
    model: nn.Module,
    loras: LoRABank | Mapping | Sequence,
    router=None,
    *,
    top_p: float = DEFAULT_TOP_P,
    max_loras: int | None = None,
    reroute: str = DEFAULT_REROUTE,
    backend: str | None = None,
    tokenizer=None,
) -> nn.Module:
    """Patch ``model`` in place so every targeted Linear adds its routed adapter mixture; returns model.

    loras: a LoRABank (or what LoRABank.from_peft accepts). router: a Router whose label_names
    are the bank's names (any order), or None to use only ``use_mixture``. top_p in (0, 1] and
    max_loras (None or >= 1) go to router.route. reroute: "prompt" (route once per sequence) or
    "sentence" (route again at every new sentence while generating; needs a tokenizer, by default
    router.tokenizer). backend: force an op backend (default: $DLP_LORA_BACKEND, else automatic).

    Every check runs before the first module is touched: on any error the model is unchanged.
    The bank follows each module's dtype and device (no copy when they already match).
    """
    if is_patched(model):
        raise PatchError("patch_model: this model is already patched; call unpatch_model(model) first")
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_model: `model` must be a torch.nn.Module, got {type(model).__name__}")
    bank = loras if isinstance(loras, LoRABank) else LoRABank.from_peft(loras)
    _check_options(top_p, max_loras, reroute)
    _check_router(router, bank)
    sentences = None
    if router is not None:
        tokenizer = tokenizer if tokenizer is not None else getattr(router, "tokenizer", None)
        if tokenizer is None and reroute == "sentence":
            raise PatchError(
                "patch_model: reroute='sentence' needs a tokenizer to find sentence ends; the router "
                "has none: pass tokenizer=... or reroute='prompt'"
            )
        # sentence ends, and the chat scaffolding the router must not read (in both modes)
        sentences = SentenceRule(tokenizer) if tokenizer is not None else None

    targets = _resolve_targets(model, bank)
    first = next(iter(targets.values()))[0] if targets else None
    if first is None:
        raise PatchError("patch_model: the bank targets no module")
    ops.resolve_backend(first.weight.device, backend, first.weight.dtype)  # a forced backend fails here
    routing = SequenceRouting(
        names=bank.names,
        router=router,
        top_p=top_p,
        max_loras=max_loras,
        reroute=reroute,
        sentences=sentences,
        backend=backend,
        probe_module=first,
        forward_signature=inspect.signature(model.forward),
    )

    # Nothing below can fail on user input: swap every module, then install the hook.
    for module, entry in targets.values():
        module.register_buffer(BUFFER_A, entry.lora_a, persistent=False)
        module.register_buffer(BUFFER_B, entry.lora_b, persistent=False)
        setattr(module, STATE_ATTR, routing)
        setattr(module, MASK_ATTR, sum(1 << i for i, rank in enumerate(entry.ranks) if rank > 0))
        module.__class__ = _patched_class(type(module))
    hook = model.register_forward_pre_hook(routing.pre_forward_hook, with_kwargs=True)
    setattr(model, HANDLE_ATTR, _PatchHandle(bank, router, routing, list(targets), hook))
    setattr(model, LOG_ATTR, routing.log_view)
    return model


def unpatch_model(model: nn.Module) -> nn.Module:
    """Undo patch_model: original classes, no extra buffers, attributes or hooks; returns model."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise PatchError("unpatch_model: this model is not patched")
    for name in handle.module_names:
        module = model.get_submodule(name)
        module.__class__ = module._dlp_base_class
        for buffer in (BUFFER_A, BUFFER_B):
            module._buffers.pop(buffer, None)
            module._non_persistent_buffers_set.discard(buffer)
        module.__dict__.pop(STATE_ATTR, None)
        module.__dict__.pop(MASK_ATTR, None)
    handle.hook.remove()
    delattr(model, HANDLE_ATTR)
    delattr(model, LOG_ATTR)
    return model


@contextlib.contextmanager
def use_mixture(
    model: nn.Module, mixtures: Sequence[Mapping[str, float] | Route | None] | Mapping[str, float]
) -> Iterator[Sequence[RoutingRecord]]:
    """Choose each row's adapters: sequence b of every forward inside uses ``mixtures[b]``.

    An entry is a fixed mixture {adapter: weight}, ``{}`` for no adapter (that row is the base
    model, bit for bit), or ``Route(top_p=..., max_loras=...)`` / None to let the router route that
    row (with its own top_p / max_loras, or the patch's). One entry
    per sequence of the batch (a single one applies to every sequence). A mixture follows the rule
    of :mod:`dlp_lora.mixture` (non-empty, known names, finite weights with |w| <= 100, negative
    allowed, zeros dropped, not all zero): MixtureError (a ValueError) names the entry otherwise.
    Weights are used as given (not renormalised; the adapters' own scaling is already in the bank).
    The previous routing (router or an outer use_mixture) comes back on exit.

    Per thread: another thread's forwards inside their own use_mixture never see these mixtures.
    Yields the routing log of this thread's latest generation (as ``model.dlp_routing_log``).
    """
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        raise PatchError("use_mixture: the model is not patched (call patch_model first)")
    parsed = _parse_mixtures(mixtures, handle.bank.names)
    call = handle.routing.call
    previous = call.rows
    call.rows = parsed
    try:
        yield handle.routing.log_view
    finally:
        call.rows = previous


# --- validation (all before any change) ----------------------------------------------------------


def _check_options(top_p, max_loras, reroute) -> None:
    check_top_p(top_p)
    check_max_loras(max_loras)
    if reroute not in REROUTE_MODES:
        raise PatchError(f"patch_model: `reroute` must be one of {REROUTE_MODES}, got {reroute!r}")


def _check_router(router, bank: LoRABank) -> None:
    if router is None:
        return
    labels = getattr(router, "label_names", None)
    if labels is None or not callable(getattr(router, "route", None)):
        raise PatchError(
            f"patch_model: `router` must have label_names and route(), got {type(router).__name__}"
        )
    mismatch = label_mismatch(labels, bank.names)
    if mismatch:
        raise PatchError(f"patch_model: the router does not fit the bank: {mismatch}")


def _resolve_targets(model: nn.Module, bank: LoRABank) -> dict:
    """{module name: (module, ModuleLoRA cast to the module's dtype/device)}; raises on any misfit."""
    targets, missing, wrong_type, wrong_shape = {}, [], [], []
    names_of: dict[int, str] = {}  # id(module) -> first name: a module shared by two names
    for name, entry in bank.modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            missing.append(name)
            continue
        if id(module) in names_of:
            raise PatchError(
                f"patch_model: {names_of[id(module)]!r} and {name!r} are one module object (tied or "
                "shared weights); the adapters give each name its own LoRA, which one module cannot hold"
            )
        names_of[id(module)] = name
        features = _in_out_features(module)
        if features is None or hasattr(type(module), "_dlp_base_class"):
            wrong_type.append((name, type(module).__name__))
        elif not module.weight.dtype.is_floating_point:
            wrong_type.append((name, f"weight dtype {module.weight.dtype}"))
        elif features != (entry.d_in, entry.d_out):
            wrong_shape.append(
                (name, f"model {features[0]} -> {features[1]}, adapters {entry.d_in} -> {entry.d_out}")
            )
        else:
            targets[name] = (module, entry)

    def describe(problems: list, what: str) -> str:
        shown = [
            f"{name} ({what(name, detail)}; adapters {_owners(bank, name)})" for name, detail in problems[:4]
        ]
        return "; ".join(shown) + (f"; and {len(problems) - 4} more" if len(problems) > 4 else "")

    if missing:
        raise PatchError(
            "patch_model: the model has no module named "
            + describe([(n, None) for n in missing], lambda n, d: "missing")
            + ". Adapters must target this architecture, with names as in model.named_modules()"
        )
    if wrong_shape:
        raise PatchError(
            "patch_model: adapter shapes do not fit the model: " + describe(wrong_shape, lambda n, d: d)
        )
    if wrong_type:
        raise PatchError(
            "patch_model: only nn.Linear and transformers Conv1D modules with floating weights can be "
            "patched: " + describe(wrong_type, lambda n, d: d)
        )
    # Cast last: every check has passed, and .to() shares tensors that already match.
    return {
        name: (module, entry.to(module.weight.dtype, module.weight.device))
        for name, (module, entry) in targets.items()
    }


def _owners(bank: LoRABank, module_name: str) -> list[str]:
    ranks = bank.modules[module_name].ranks
    return [name for name, r in zip(bank.names, ranks, strict=True) if r > 0]


def _parse_mixtures(mixtures, names: list[str]) -> list[RowSpec]:
    """use_mixture's entries -> a Route or (bank ids, weights) per sequence; ValueError names the entry."""
    if isinstance(mixtures, Mapping):
        mixtures = [mixtures]
    if isinstance(mixtures, (str, bytes)) or not isinstance(mixtures, Sequence) or not mixtures:
        raise ValueError(
            "use_mixture: `mixtures` must be a non-empty list of {adapter_name: weight} dicts or Route() "
            f"entries (one per sequence), got {mixtures!r}"
        )
    parsed = []
    for b, mixture in enumerate(mixtures):
        if mixture is None or isinstance(mixture, Route):
            parsed.append(mixture or Route())
            continue
        if not isinstance(mixture, Mapping):
            raise ValueError(
                f"use_mixture: mixtures[{b}] must be a dict {{adapter_name: weight}}, a Route or None, "
                f"got {mixture!r}"
            )
        if not mixture:  # no adapter: the base model for this row (a row's choice, not a mixture)
            parsed.append(((), ()))
            continue
        try:
            parsed.append(Mixture(mixture, names).bank_ids(names))
        except MixtureError as e:
            raise e.named(f"use_mixture: mixtures[{b}]") from None
    return parsed
