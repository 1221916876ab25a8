"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685) for model.py's GPT.

Paper §4.1. A pre-trained weight W0 (d_out × d_in) stays frozen; its update is constrained to a
low-rank product ΔW = B·A, with B (d_out × r), A (r × d_in) and r ≪ min(d_in, d_out):

    h = W0·x + ΔW·x = W0·x + (α/r)·B·A·x                                    (paper, eq. 3)

A starts random and B at zero, so ΔW = 0 and the adapted model equals the base at step 0. The
scaling α/r keeps the size of the update roughly independent of r, so α needs no retuning when r
changes. After training, W = W0 + (α/r)·B·A can be computed once ("merged"), and inference costs
exactly what the base costs (§4.1, "No Additional Inference Latency"); subtracting it again
recovers W0, so one base serves many tasks by swapping small adapters.

This file reads in that order: the layer, injection by exact name (§4.2: which weights),
merge/unmerge, adapter files, then several adapters on one base: switching the merged one, and
batches whose rows each use their own adapter (a limitation of merging, paper §4.2).
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model import GPT, atomic_path, config_dict


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen weight W0 gets a low-rank update on some blocks of its rows.

    `parts` names each adapted block of output rows: GPT-2's fused c_attn (3C × C) holds Wq, Wk
    and Wv stacked, and each adapted one gets its own A and B, as in the authors' `MergedLinear`
    with `enable_lora=[True, False, True]`. An unfused matrix (c_proj, c_fc) has one part that
    covers all its rows. It subclasses nn.Linear and shares the original's weight and bias, so
    the base keys of the state dict (`...c_attn.weight`) do not change.

    `lora_A` and `lora_B` are the active adapter: the one training updates and merge folds in.
    `bank_A` and `bank_B` hold every named adapter (see `add_adapter`) stacked, for switching and
    for mixed batches, where `adapter_index` (one entry per row of the batch) picks each row's own.
    """

    def __init__(self, base: nn.Linear, parts: dict[str, slice], rank: int, alpha: float, dropout: float):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse base's tensors, allocate none
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts = parts
        self.scaling = alpha / rank
        factory = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(rank, self.in_features, **factory)) for name in parts}
        )
        self.lora_B = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(rows.stop - rows.start, rank, **factory)) for name, rows in parts.items()}
        )
        self.lora_dropout = nn.Dropout(dropout)
        self.merged = False
        self.bank_A = nn.ParameterDict()  # part -> (n_adapters, r, d_in), filled by add_adapter
        self.bank_B = nn.ParameterDict()  # part -> (n_adapters, d_rows, r)
        self.adapter_index: torch.Tensor | None = None  # (B,): each row's adapter, -1 for none
        for A in self.lora_A.values():
            # The paper says "random Gaussian" for A without a scale. Like the authors' loralib
            # (and PEFT) we use nn.Linear's Kaiming-uniform init: its scale, 1/sqrt(d_in), keeps
            # A·x near unit size whatever the width, and the paper's results were made with it.
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)  # W0·x (or (W0 + ΔW)·x once merged)
        if self.merged:
            return out
        x = self.lora_dropout(x)
        if self.adapter_index is not None:
            return self._add_per_row_updates(out, x)
        # (α/r)·B·(A·x) in the low-rank order: (…, d_in) -> (…, r) -> (…, d_rows); the d_out × d_in
        # matrix B·A is never built on this path. One matmul gives A·x for every part (their A's
        # stacked), then each part's B adds into its rows of `out` in place, α/r included (addmm_'s
        # alpha): a few small kernels, and no extra pass over the large output. The explicit casts
        # give everything out's dtype (bf16 under autocast), which the in-place addmm_ needs.
        A = torch.cat([self.lora_A[name] for name in self.parts])  # (n_parts·r, d_in); parts' order, not the dict's
        x_A = x.to(out.dtype) @ A.to(out.dtype).t()  # (…, n_parts·r)
        out_2d, x_A_2d = out.view(-1, self.out_features), x_A.view(-1, x_A.size(-1))
        rank = x_A.size(-1) // len(self.parts)
        for i, (name, rows) in enumerate(self.parts.items()):
            B = self.lora_B[name].to(out.dtype)
            out_2d[:, rows].addmm_(x_A_2d[:, i * rank : (i + 1) * rank], B.t(), alpha=self.scaling)
        return out

    def _add_per_row_updates(self, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Eq. 3 with each row's own adapter: gather every row's A and B from the bank, then two
        batched matmuls, still in the low-rank order; no loop over rows or adapters."""
        if x.size(0) != self.adapter_index.size(0):
            raise ValueError(f"a batch of {x.size(0)} rows but {self.adapter_index.size(0)} adapter choices")
        has_adapter = (self.adapter_index >= 0).to(out.dtype).view(-1, 1, 1)  # rows with -1 get nothing
        index = self.adapter_index.clamp(min=0)
        for name, rows in self.parts.items():
            A_per_row = self.bank_A[name][index]  # (B, r, d_in)
            B_per_row = self.bank_B[name][index]  # (B, d_rows, r)
            # (B, T, d_in) -> (B, T, r) -> (B, T, d_rows)
            low_rank = x @ A_per_row.transpose(1, 2) @ B_per_row.transpose(1, 2)
            out[..., rows] += low_rank * (self.scaling * has_adapter)
        return out

    def delta_weight(self, name: str) -> torch.Tensor:
        """ΔW = (α/r)·B·A of one part, in fp32 (d_rows × d_in)."""
        return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        """W ← W0 + ΔW on each part. In fp32, then cast once; a second call changes nothing."""
        if not self.merged:
            for name, rows in self.parts.items():
                self.weight[rows] = (self.weight[rows].float() + self.delta_weight(name)).to(self.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """W ← W - ΔW. Exact to fp32 rounding (≤ 1e-6) in fp32. In bf16/fp16 the weight was rounded
        when merged, so W0 comes back only to within about one rounding step of that dtype."""
        if self.merged:
            for name, rows in self.parts.items():
                self.weight[rows] = (self.weight[rows].float() - self.delta_weight(name)).to(self.weight.dtype)
            self.merged = False


# ---- which weights to adapt (§4.2, Table 5: Wq and Wv together work best on a fixed budget) ------

# target -> (module inside each block, which block of its rows, into how many blocks they split)
TARGETS: dict[str, list[tuple[str, int, int]]] = {
    "q": [("attn.c_attn", 0, 3)],
    "k": [("attn.c_attn", 1, 3)],
    "v": [("attn.c_attn", 2, 3)],
    "o": [("attn.c_proj", 0, 1)],
    "mlp": [("mlp.c_fc", 0, 1), ("mlp.c_proj", 0, 1)],
}
DEFAULT_TARGETS = ("q", "v")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target {unknown or self.targets!r}: choose from {', '.join(TARGETS)}")
        # canonical order, no repeats, so equal configs compare equal
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v'), for command lines."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def apply_lora(
    model: GPT, rank: int = 4, alpha: float = 8.0, targets: tuple[str, ...] = DEFAULT_TARGETS, dropout: float = 0.0
) -> GPT:
    """Freeze every parameter of `model`, then wrap the targeted projections of every block in
    LoRALinear (matched by exact module name, never by substring). Returns the same model."""
    config = LoRAConfig(rank, alpha, tuple(targets), dropout)
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad = False
    for block in model.transformer.h:
        parts_by_module: dict[str, dict[str, slice]] = {}
        for target in config.targets:
            for module_name, index, n_blocks in TARGETS[target]:
                size = block.get_submodule(module_name).out_features // n_blocks
                parts_by_module.setdefault(module_name, {})[target] = slice(index * size, (index + 1) * size)
        for module_name, parts in parts_by_module.items():
            parent_name, _, child_name = module_name.rpartition(".")
            base = block.get_submodule(module_name)
            setattr(block.get_submodule(parent_name), child_name, LoRALinear(base, parts, rank, alpha, dropout))
    model.lora_config = config
    model.adapter_names = []  # the named adapters in each layer's bank, in bank order
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def parameter_summary(model: nn.Module) -> str:
    """'trainable 147,456 / total 124,587,264 (0.12%)'; tied weights counted once."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)"


# ---- merge / unmerge (§4.1: no additional inference latency) -------------------------------------


def merge_lora(model: nn.Module) -> None:
    """Fold ΔW into every adapted weight for inference. Explicit, never a side effect of eval()."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take ΔW out again, recovering W0 (to fp32 rounding in fp32)."""
    for layer in lora_layers(model):
        layer.unmerge()


# ---- adapter files: safetensors with the LoRA tensors only, and JSON metadata in its header ------


def unwrap(model: nn.Module) -> nn.Module:
    """The model under torch.compile's `_orig_mod` and DDP's `module`, so saved keys carry neither."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA tensors, keyed like `transformer.h.0.attn.c_attn.lora_A.q`."""
    return {k: v for k, v in unwrap(model).state_dict().items() if ".lora_A." in k or ".lora_B." in k}


def base_fingerprint(model: GPT) -> dict[str, list[float]]:
    """A strided sample of 8 values of every frozen base tensor (W0 for the adapted ones), enough to
    tell two bases of the same shape apart, even when only one block differs. It is compared with a
    tolerance (`same_base`), so a bf16 copy of the base still matches."""
    raw = unwrap(model)
    with _unmerged(raw), torch.no_grad():
        return {
            name: tensor.flatten()[:: max(1, tensor.numel() // 8)][:8].float().tolist()
            for name, tensor in raw.state_dict().items()
            if ".lora_" not in name and ".bank_" not in name and name != "lm_head.weight"  # lm_head: tied to wte
        }


def same_base(fingerprint: dict[str, list[float]], other: dict[str, list[float]]) -> bool:
    """Whether two base fingerprints come from the same weights (to bf16 rounding)."""
    return fingerprint.keys() == other.keys() and all(
        torch.allclose(torch.tensor(fingerprint[k]), torch.tensor(other[k]), rtol=1e-2, atol=1e-3) for k in fingerprint
    )


def save_adapter(model: GPT, path: str) -> None:
    """Write the LoRA tensors and what is needed to rebuild them onto the right base. Atomic."""
    raw = unwrap(model)
    metadata = {
        "lora_config": json.dumps(asdict(raw.lora_config)),
        "base": raw.name_or_path,
        "base_config": json.dumps(config_dict(raw.config)),
        "base_fingerprint": json.dumps(base_fingerprint(raw)),
    }
    tensors = {k: v.detach().contiguous() for k, v in lora_state_dict(raw).items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@contextmanager
def open_safetensors(path: str) -> Iterator:
    """safetensors' safe_open, with a file that is not safetensors at all reported as a ValueError
    naming it (safetensors raises its own exception type, which callers would not expect)."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an adapter file; metadata's JSON fields decoded."""
    with open_safetensors(path) as f:
        raw_metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if "lora_config" not in raw_metadata:
        raise ValueError(f"{path} is not an adapter written by lora.py (no lora_config in its metadata)")
    metadata = {k: json.loads(v) if k != "base" else v for k, v in raw_metadata.items()}
    metadata["lora_config"]["targets"] = tuple(metadata["lora_config"]["targets"])
    return tensors, metadata


def load_adapter(model: GPT, path: str) -> LoRAConfig:
    """Load an adapter onto `model`: injects LoRA first if the model has none. If the model is
    merged, the old adapter is unmerged and the new one merged: switching tasks on one base.
    Raises ValueError naming the mismatch for an adapter of another base, shape or config."""
    tensors, metadata = read_adapter(path)
    raw = unwrap(model)
    config = _fit_adapter(raw, path, tensors, metadata)
    active = lora_state_dict(raw)
    with _unmerged(raw), torch.no_grad():
        for key, tensor in tensors.items():
            active[key].copy_(tensor)  # state_dict tensors share storage with the parameters
    return config


def _fit_adapter(raw: GPT, path: str, tensors: dict[str, torch.Tensor], metadata: dict) -> LoRAConfig:
    """Check that an adapter file fits this base and its LoRA (injecting LoRA if it has none)."""
    want, have = metadata["base_config"], config_dict(raw.config)
    diff = [f"{k} {want.get(k)} (adapter) vs {have[k]} (model)" for k in have if want.get(k) != have[k]]
    if diff:
        raise ValueError(f"{path} was trained on another base ({metadata['base']}): {', '.join(diff)}")
    if not same_base(metadata["base_fingerprint"], base_fingerprint(raw)):
        raise ValueError(
            f"{path} was trained on base '{metadata['base']}', whose weights differ from this model's "
            f"('{raw.name_or_path}'): load the base it was trained on"
        )
    config = LoRAConfig(**metadata["lora_config"])
    if getattr(raw, "lora_config", None) is None:
        apply_lora(raw, config.rank, config.alpha, config.targets, config.dropout)
    elif (raw.lora_config.rank, raw.lora_config.alpha, raw.lora_config.targets) != (
        config.rank, config.alpha, config.targets,
    ):
        have_config = raw.lora_config
        raise ValueError(
            f"{path} has rank {config.rank}, alpha {config.alpha} on {','.join(config.targets)}; the model's "
            f"LoRA has rank {have_config.rank}, alpha {have_config.alpha} on {','.join(have_config.targets)}"
        )
    expected = lora_state_dict(raw)
    if set(tensors) != set(expected):
        raise ValueError(f"{path} holds other LoRA tensors than this model ({sorted(set(tensors) ^ set(expected))[:3]} ...)")
    return config


@contextmanager
def _unmerged(raw: GPT) -> Iterator[None]:
    """Take ΔW out while the body changes the active A and B; merge the new ΔW in afterwards if
    the model was merged. W0 itself is never reloaded."""
    was_merged = any(layer.merged for layer in lora_layers(raw))
    unmerge_lora(raw)
    yield
    if was_merged:
        merge_lora(raw)


# ---- several adapters on one base ----------------------------------------------------------------
#
# §4.1: to switch tasks, recover W0 by subtracting B·A, then add another B'·A'. §4.2 (practical
# benefits) adds that only the LoRA weights are swapped, not the whole model, and names the cost:
# with A and B merged into W, inputs of different tasks cannot share one forward pass, unless the
# modules stay unmerged and are chosen per sample. Here each layer keeps every named adapter's A
# and B stacked in its bank (0.6 MB an adapter for GPT-2 small at r = 4 on q,v); `set_adapter`
# swaps one in (an unmerge and a merge, never a reload of the base), and `adapter_per_row` gives
# each row of one unmerged batch its own adapter.


def add_adapter(model: GPT, name: str, path: str | None = None) -> None:
    """Keep an adapter under `name` in the model's bank: the one in the file `path` (checked like
    load_adapter), or without a path a copy of the model's active adapter (e.g. one just trained).
    All adapters on one model share the rank, alpha and targets, so that they stack."""
    raw = unwrap(model)
    if path is not None:
        tensors, metadata = read_adapter(path)
        _fit_adapter(raw, path, tensors, metadata)
    elif getattr(raw, "lora_config", None) is None:
        raise ValueError("this model has no LoRA layers to copy an adapter from")
    else:
        tensors = lora_state_dict(raw)
    if name in raw.adapter_names:
        raise ValueError(f"an adapter named '{name}' is already on this model")
    for module_name, layer in _named_lora_layers(raw):
        for bank, kind in ((layer.bank_A, "lora_A"), (layer.bank_B, "lora_B")):
            for part in layer.parts:
                # a copy, never a view: the bank must not change when the active adapter trains or loads
                new = tensors[f"{module_name}.{kind}.{part}"].detach().to(layer.weight.device, layer.weight.dtype)
                stacked = torch.cat([bank[part], new[None]]) if part in bank else new[None].clone()
                bank[part] = nn.Parameter(stacked, requires_grad=False)  # frozen unless you train the bank
    raw.adapter_names.append(name)


def set_adapter(model: GPT, name: str) -> None:
    """Make the named adapter the active one. On a merged model this switches the merged task:
    the old ΔW comes out, the new one goes in (fp32: W0 in between to ≤ 1e-6)."""
    raw = unwrap(model)
    index = _adapter_indices(raw, [name])[0]
    with _unmerged(raw), torch.no_grad():
        for layer in lora_layers(raw):
            for part in layer.parts:
                layer.lora_A[part].copy_(layer.bank_A[part][index])
                layer.lora_B[part].copy_(layer.bank_B[part][index])


@contextmanager
def adapter_per_row(model: GPT, names: list[str | None]) -> Iterator[None]:
    """Inside the block, row b of every batch runs with the adapter names[b] (None: the base
    alone), in one forward pass. Works for generation (the rows keep their adapters at every step)
    and for training: gradients reach the banks of the adapters used, zero for the others (set
    `requires_grad` on the `bank_A`/`bank_B` parameters to train them). Needs an unmerged model."""
    raw = unwrap(model)
    layers = lora_layers(raw)
    if any(layer.merged for layer in layers):
        raise ValueError("mixed-adapter batches run unmerged: call unmerge_lora(model) first")
    index = torch.tensor(_adapter_indices(raw, names), device=layers[0].weight.device)
    for layer in layers:
        layer.adapter_index = index
    try:
        yield
    finally:
        for layer in layers:
            layer.adapter_index = None


def _adapter_indices(raw: GPT, names: list[str | None]) -> list[int]:
    known = getattr(raw, "adapter_names", [])
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(f"no adapter named '{unknown[0]}' on this model (it has: {', '.join(known) or 'none'})")
    return [-1 if n is None else known.index(n) for n in names]


def _named_lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]
