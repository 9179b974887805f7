"""LoRABank: every adapter's LoRA weights, stacked per targeted module, ready for the multi-LoRA op.

    bank = LoRABank.from_peft({"math": "adapters/gsm8k", "de_en": "adapters/news_de"})

For each targeted module (named as in the base model, e.g. ``model.layers.0.self_attn.q_proj``)
the bank holds one :class:`ModuleLoRA`:

    lora_a   [N, r_max, d_in]   lora_A.weight of every adapter (PEFT layout), zero-padded to r_max
    lora_b   [N, d_out, r_max]  scaling[i] * lora_B.weight of adapter i, zero-padded to r_max
    scaling  [N] float32        lora_alpha / r (or / sqrt(r) with rslora); 0 where the adapter is absent

Zero padding is exact: padded rows of A meet padded columns of B, so a rank-4 adapter in a rank-8
bank adds the same delta. An adapter that does not target a module is all zeros there.

The scaling is folded into lora_b at load, so the op's ``lora_weights`` are just the mixture
weights and one routing tensor serves every module of a forward (see dlp_lora/patch.py).

Loading is eager: ``from_peft`` reads every adapter into memory (``bank.nbytes`` says how much).
A lazy bank would only move that cost to the first forward, where a router may pick any adapter.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from .adapters import AdapterLoadError, AdapterModule, check_adapter_module, read_peft_adapter
from .ops.reference import accumulation_dtype

__all__ = ["LoRABank", "ModuleLoRA", "AdapterLoadError", "read_peft_adapter"]

@dataclass(frozen=True)
class ModuleLoRA:
    """The stacked adapters of one targeted module.

    lora_a [N, r_max, d_in] and lora_b [N, d_out, r_max] share one floating dtype and device;
    lora_b already includes each adapter's scaling. scaling [N] float32 and ranks (N ints,
    0 = adapter absent here) are kept for inspection.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor
    scaling: torch.Tensor
    ranks: tuple[int, ...]

    @property
    def d_in(self) -> int:
        return self.lora_a.shape[2]

    @property
    def d_out(self) -> int:
        return self.lora_b.shape[1]

    @property
    def rank(self) -> int:
        """r_max: the padded rank every adapter has in this module."""
        return self.lora_a.shape[1]

    @property
    def nbytes(self) -> int:
        return self.lora_a.nbytes + self.lora_b.nbytes

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ModuleLoRA:
        """Same module with lora_a/lora_b cast or moved (no copy when nothing changes)."""
        a = self.lora_a.to(dtype=dtype, device=device)
        b = self.lora_b.to(dtype=dtype, device=device)
        if a is self.lora_a and b is self.lora_b:
            return self
        return dataclasses.replace(self, lora_a=a, lora_b=b)


# One adapter's weights for one module: lora_A.weight [r, d_in], lora_B.weight [d_out, r], scaling.


class LoRABank:
    """N LoRA adapters stacked per targeted module (see the module docstring).

    names    list[str], adapter i of every stacked tensor is names[i]
    modules  dict module_name -> ModuleLoRA, in the base model's naming
    configs  dict adapter name -> its adapter_config.json (empty for banks built from tensors)
    sources  dict adapter name -> the directory it was read from (from_peft only)
    """

    def __init__(
        self,
        names: Iterable[str],
        modules: Mapping[str, ModuleLoRA],
        configs: Mapping[str, dict] | None = None,
        sources: Mapping[str, str | Path] | None = None,
    ):
        self.names: list[str] = list(names)
        self.modules: dict[str, ModuleLoRA] = dict(modules)
        self.configs: dict[str, dict] = dict(configs or {})
        self.sources: dict[str, Path] = {name: Path(path) for name, path in (sources or {}).items()}
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"LoRABank: adapter names must be unique, got {self.names}")
        if not self.names:
            raise ValueError("LoRABank: needs at least one adapter")
        for module_name, entry in self.modules.items():
            if entry.lora_a.shape[0] != len(self.names) or entry.lora_b.shape[0] != len(self.names):
                raise ValueError(
                    f"LoRABank: module {module_name!r} stacks {entry.lora_a.shape[0]} adapters, "
                    f"expected {len(self.names)} ({self.names})"
                )

    # --- construction ------------------------------------------------------------------------------

    @classmethod
    def from_peft(
        cls,
        adapters: Mapping[str, str | Path] | Iterable[str | Path],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> LoRABank:
        """Load PEFT LoRA adapters (directories written by ``save_pretrained``).

        adapters: dict name -> directory, or a list of directories (each named by its folder).
        dtype/device: of the stacked tensors (default: the files' dtype, CPU). ``patch_model``
        casts to the model's dtype and device anyway.
        Raises AdapterLoadError, naming the adapter, for DoRA and other LoRA variants, lora_bias,
        a trained base bias (bias != "none"), modules_to_save / trainable tokens, embedding LoRA,
        or PiSSA-style initialisations that rewrite the base weights.
        """
        if isinstance(adapters, (str, Path)):
            raise TypeError(
                "LoRABank.from_peft: `adapters` must be a dict name -> directory or a list of "
                f"directories, got the single path {str(adapters)!r} (wrap it in a list)"
            )
        if isinstance(adapters, Mapping):
            named = [(str(name), Path(path)) for name, path in adapters.items()]
        else:
            named = [(Path(path).name, Path(path)) for path in adapters]
        if not named:
            raise ValueError("LoRABank.from_peft: `adapters` is empty")
        names = [name for name, _ in named]
        if len(set(names)) != len(names):
            raise ValueError(
                f"LoRABank.from_peft: adapter names must be unique, got {names} "
                "(pass a dict name -> directory to name them)"
            )
        weights, configs = {}, {}
        for name, path in named:
            weights[name], configs[name] = read_peft_adapter(name, path)  # values checked there
        bank = cls._stack(weights, dtype=dtype, device=device, configs=configs)
        bank.sources = dict(named)
        return bank

    @classmethod
    def from_adapters(
        cls,
        adapters: Mapping[str, Mapping[str, AdapterModule]],
        *,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        configs: Mapping[str, dict] | None = None,
    ) -> LoRABank:
        """Stack in-memory adapters: {adapter: {module_name: (lora_A [r, d_in], lora_B [d_out, r], scaling)}}.

        The entry point for adapters that do not come from PEFT files (benchmarks, synthetic banks).
        Mixed ranks are zero-padded to the module's largest rank; an adapter absent from a module
        is zero there. The folded product scaling * lora_B is computed in float32 (float64 for
        float64 inputs) before casting to ``dtype`` (default: the promoted dtype of the inputs).
        Raises AdapterLoadError (a ValueError) for non-floating or non-finite weights or scalings.
        """
        for name, per_module in adapters.items():
            for module_name, (a, b, scaling) in per_module.items():
                check_adapter_module(name, module_name, a, b, scaling)
        return cls._stack(adapters, dtype=dtype, device=device, configs=configs)

    @classmethod
    def _stack(cls, adapters, *, dtype, device, configs) -> LoRABank:
        names = list(adapters)
        module_names: list[str] = []
        for per_module in adapters.values():
            module_names += [m for m in per_module if m not in module_names]
        if dtype is None:
            dtype = torch.float32
            found = [
                t.dtype for per_module in adapters.values() for a, b, _ in per_module.values() for t in (a, b)
            ]
            if found:
                dtype = found[0]
                for other in found[1:]:
                    dtype = torch.promote_types(dtype, other)
        modules = {m: _stack_module(m, names, adapters, dtype, device) for m in module_names}
        return cls(names, modules, configs)

    # --- inspection --------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_loras(self) -> int:
        return len(self.names)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stacked lora_a/lora_b tensors (padding included)."""
        return sum(entry.nbytes for entry in self.modules.values())

    @property
    def dtype(self) -> torch.dtype | None:
        return next(iter(self.modules.values())).lora_a.dtype if self.modules else None

    @property
    def device(self) -> torch.device | None:
        return next(iter(self.modules.values())).lora_a.device if self.modules else None

    def index(self, name: str) -> int:
        """Position of adapter ``name`` in the stacked tensors."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"unknown adapter {name!r}; the bank holds {self.names}") from None

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> LoRABank:
        """A bank with every module cast/moved; tensors that already match are shared, not copied."""
        modules = {m: e.to(dtype, device) for m, e in self.modules.items()}
        return LoRABank(self.names, modules, self.configs, self.sources)

    def summary(self, verbose: bool = False) -> str:
        """Readable text: per adapter its ranks, scaling and targets, per module kind (``self_attn.q_proj``:
        the name after the layer index) its layers, shapes and memory; ``verbose`` adds every module,
        in numeric layer order."""
        lines = [
            f"LoRABank: {len(self.names)} adapters, {len(self.modules)} target modules, "
            f"{self.nbytes / 2**20:.2f} MiB ({self.dtype}, {self.device}), eagerly loaded"
        ]
        for i, name in enumerate(self.names):
            present = {m: e for m, e in self.modules.items() if e.ranks[i] > 0}
            ranks = sorted({e.ranks[i] for e in present.values()})
            scalings = sorted({round(float(e.scaling[i]), 6) for e in present.values()})
            cfg = self.configs.get(name, {})
            extra = ", rslora" if cfg.get("use_rslora") else ""
            kinds = _by_kind(present)
            targets = ", ".join(f"{kind} ({_layers(layers)})" for kind, layers in kinds.items())
            lines.append(
                f"  [{i}] {name}: {len(present)} modules, rank {_span(ranks)}, "
                f"scaling {_span(scalings)}{extra}; {targets}"
            )
        lines.append("  module kinds (layers, d_in -> d_out, r_max, memory):")
        for kind, layers in _by_kind(self.modules).items():
            entries = [self.modules[name] for name in layers.values()]
            shapes = sorted({f"{e.d_in} -> {e.d_out}" for e in entries})
            r_max = _span(sorted({e.rank for e in entries}))
            kib = sum(e.nbytes for e in entries) / 2**10
            lines.append(f"    {kind}: {_layers(layers)}, {', '.join(shapes)}, r_max {r_max}, {kib:.1f} KiB")
        if verbose:
            lines.append("  modules (d_in -> d_out, r_max):")
            for module_name in sorted(self.modules, key=_numeric_order):
                e = self.modules[module_name]
                lines.append(
                    f"    {module_name}: {e.d_in} -> {e.d_out}, r_max {e.rank}, {e.nbytes / 2**10:.1f} KiB"
                )
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (
            f"LoRABank(names={self.names}, modules={len(self.modules)}, "
            f"nbytes={self.nbytes}, dtype={self.dtype})"
        )


def _numeric_order(module_name: str) -> tuple:
    """Sort key: layers.2 before layers.10 (numbers compare as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in module_name.split("."))


def _by_kind(module_names) -> dict[str, dict[int | None, str]]:
    """{kind: {layer index: module name}}: the kind is the name after its first numeric part (the
    layer index), e.g. ``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj`` in layer 3; a name
    with no number is its own kind, layer None."""
    kinds: dict[str, dict[int | None, str]] = {}
    for module_name in sorted(module_names, key=_numeric_order):
        parts = module_name.split(".")
        index = next((i for i, part in enumerate(parts) if part.isdigit()), None)
        if index is None or index == len(parts) - 1:
            kinds.setdefault(module_name, {})[None] = module_name
        else:
            kinds.setdefault(".".join(parts[index + 1:]), {})[int(parts[index])] = module_name
    return kinds


def _layers(layers: dict) -> str:
    """``layers 0-29`` / ``layers 0-3, 8`` / ``1 module`` (no layer index)."""
    numbers = sorted(n for n in layers if n is not None)
    if not numbers:
        return f"{len(layers)} module"
    runs, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None], strict=True):
        if cur is None or cur != prev + 1:  # a run ends
            runs.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ("layer " if len(numbers) == 1 else "layers ") + ", ".join(runs)


def _span(values: list) -> str:
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _stack_module(
    module_name: str,
    names: list[str],
    adapters: Mapping[str, Mapping[str, AdapterModule]],
    dtype: torch.dtype,
    device,
) -> ModuleLoRA:
    present = {name: adapters[name][module_name] for name in names if module_name in adapters[name]}
    shapes = {name: (a.shape[1], b.shape[0]) for name, (a, b, _) in present.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(
            f"LoRABank: adapters disagree on the shape of {module_name!r} (d_in, d_out): {shapes}"
        )
    for name, (a, b, _) in present.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRABank: adapter {name!r}, module {module_name!r}: lora_A {tuple(a.shape)} and "
                f"lora_B {tuple(b.shape)} are not [r, d_in] and [d_out, r]"
            )
    d_in, d_out = next(iter(shapes.values()))
    r_max = max(a.shape[0] for a, _, _ in present.values())
    acc = accumulation_dtype(dtype)
    lora_a = torch.zeros(len(names), r_max, d_in, dtype=dtype, device=device)
    lora_b = torch.zeros(len(names), d_out, r_max, dtype=dtype, device=device)
    scaling = torch.zeros(len(names), dtype=torch.float32)
    ranks = []
    for i, name in enumerate(names):
        if name not in present:
            ranks.append(0)
            continue
        a, b, s = present[name]
        r = a.shape[0]
        lora_a[i, :r] = a.to(device=device, dtype=dtype)
        lora_b[i, :, :r] = (b.to(device=device, dtype=acc) * s).to(dtype)
        scaling[i] = s
        ranks.append(r)
    return ModuleLoRA(lora_a, lora_b, scaling, tuple(ranks))
