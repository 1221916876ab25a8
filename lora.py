"""LoRA: Low-Rank Adaptation (Hu et al., 2021, arXiv:2106.09685) for model.py's GPT.

Paper §4.1. A pre-trained weight W0 (d_out × d_in) stays frozen; its update is constrained to a
low-rank product ΔW = B·A, with B (d_out × r), A (r × d_in) and r ≪ min(d_in, d_out):

    h = W0·x + ΔW·x = W0·x + (α/r)·B·A·x                                    (paper, eq. 3)

A starts random and B at zero, so ΔW = 0 and the adapted model equals the base at step 0. The scaling α/r keeps
the size of the update roughly independent of r, so α needs no retuning when r changes. After training,
W = W0 + (α/r)·B·A can be computed once ("merged"), and inference costs exactly what the base costs (§4.1, "No
Additional Inference Latency"); subtracting it again recovers W0: one base serves many tasks by swapping adapters.

This file reads in that order: the layer (eq. 3), the settings, injection by exact name (§4.2),
merge/unmerge, adapter files. Several adapters in one batch: lab/multi_adapter.py. A variant of the layer
(DoRA: lab/dora.py) is a subclass named in VARIANTS; everything else asks the layer, never re-derives it.
"""

from __future__ import annotations

import importlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

from model import GPT, TARGETS, config_dict, same_weights, weights_fingerprint
from utils import atomic_path, open_safetensors, unwrap


class LoRALinear(nn.Linear):
    """An nn.Linear whose frozen weight W0 gets a low-rank update on some chunks of its rows.

    `parts` names each adapted chunk of output rows: GPT-2's fused c_attn (3C × C) stacks Wq, Wk
    and Wv, and each adapted one gets its own A and B (the authors' `MergedLinear(enable_lora=[True,
    False, True])`); c_proj or c_fc has one part of all its rows. It shares the original's weight
    and bias, so the state dict's base keys (`...c_attn.weight`) do not change."""

    update_is_low_rank = True  # ΔW = (α/r)·B·A, of rank ≤ r: §7's subspace analysis reads it from A and B

    def __init__(self, base: nn.Linear, parts: dict[str, slice], config: LoRAConfig):
        nn.Module.__init__(self)  # not nn.Linear.__init__: reuse base's tensors, allocate none
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.parts, self.scaling = parts, config.scaling
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        r, rows = config.rank, {name: part.stop - part.start for name, part in parts.items()}
        self.lora_A = nn.ParameterDict(
            {name: nn.Parameter(torch.empty(r, self.in_features, **factory)) for name in parts}
        )
        self.lora_B = nn.ParameterDict({name: nn.Parameter(torch.zeros(rows[name], r, **factory)) for name in parts})
        self.lora_dropout = nn.Dropout(config.dropout)
        self.merged = False
        for A in self.lora_A.values():
            # The paper says "random Gaussian" for A without a scale. Like the authors' loralib
            # (and PEFT) we use nn.Linear's Kaiming-uniform init: its scale, 1/sqrt(d_in), keeps
            # A·x near unit size whatever the width, and the paper's results were made with it.
            nn.init.kaiming_uniform_(A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # W0·x (or (W0 + ΔW)·x once merged)
        if self.merged:
            return h
        x = self.lora_dropout(x)
        for name, rows in self.parts.items():
            # eq. 3: + (α/r)·B·(A·x), in the low-rank order (…, d_in) -> (…, r) -> (…, d_rows): B·A is never built
            # (.mT: A and B may carry a leading batch dimension, one adapter per row: lab/multi_adapter.py)
            delta = self.scaling * (x @ self.lora_A[name].mT @ self.lora_B[name].mT)
            h = h + F.pad(delta, (rows.start, self.out_features - rows.stop))  # zero outside its rows; out of place
        return h

    def adapter_tensors(self) -> dict[str, nn.Parameter]:
        """What this layer adds to the base, found by ownership: every parameter but W0's weight and bias (A and
        B, and whatever a variant adds). An adapter file holds exactly these."""
        return {key: p for key, p in self.named_parameters() if key not in ("weight", "bias")}

    def delta_weight(self, name: str) -> torch.Tensor:
        """The update of one part, W_eff − W0 = (α/r)·B·A, in fp32 (d_rows × d_in), also inside autocast
        (which would make it bf16). Read it while unmerged: a variant's update may depend on W0."""
        with torch.autocast(self.weight.device.type, enabled=False):
            return (self.lora_B[name].float() @ self.lora_A[name].float()) * self.scaling

    def merge(self) -> None:
        """W ← W0 + ΔW on each part. In fp32, then cast once; a second call changes nothing."""
        if not self.merged:
            self._add_to_weight(+1.0)
            self.merged = True

    def unmerge(self) -> None:
        """W ← W - ΔW: exact to fp32 rounding in fp32, to about one rounding step in bf16/fp16 (merged, then rounded)."""
        if self.merged:
            self._add_to_weight(-1.0)
            self.merged = False

    @torch.no_grad()
    def _add_to_weight(self, sign: float) -> None:
        for name, rows in self.parts.items():
            self.weight[rows] = (self.weight[rows].float() + sign * self.delta_weight(name)).to(self.weight.dtype)


# ---- the settings, and which weights to adapt (§4.2, Table 5: Wq and Wv together do best) --------
#
# model.TARGETS names GPT-2's weights by the paper's names: q, k, v (row chunks of the fused c_attn), o, mlp.

DEFAULT_TARGETS = ("q", "v")

# The kinds of adapted layer, by LoRAConfig.variant: LoRALinear, or a subclass that changes its maths (a learner's
# variant is a class and one line here). Imported when a config first asks, so the core never imports lab/.
VARIANTS = {"lora": "lora.LoRALinear", "dora": "lab.dora.DoRALinear"}


@dataclass(frozen=True)
class LoRAConfig:
    """Everything that shapes an adapter; saved in every adapter file."""

    rank: int = 4
    alpha: float = 8.0
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dropout: float = 0.0
    variant: str = "lora"  # which layer does it: a key of VARIANTS

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"unknown LoRA target {unknown or self.targets!r}: choose from {', '.join(TARGETS)}")
        if self.variant not in VARIANTS:
            raise ValueError(f"unknown LoRA variant {self.variant!r}: choose from {', '.join(VARIANTS)}")
        # canonical order, no repeats, so equal configs compare equal
        object.__setattr__(self, "targets", tuple(t for t in TARGETS if t in self.targets))

    @property
    def scaling(self) -> float:
        """α/r (§4.1): the factor on B·A."""
        return self.alpha / self.rank

    @property
    def layer(self) -> type[LoRALinear]:
        """The class of the adapted layers: LoRALinear, or the variant's subclass."""
        module, _, name = VARIANTS[self.variant].rpartition(".")
        return getattr(importlib.import_module(module), name)

    @classmethod
    def from_dict(cls, settings: dict, where: str) -> LoRAConfig:
        """The config asdict() wrote to `where`; a setting added since then takes its default."""
        try:
            return cls(**settings)
        except (TypeError, ValueError) as e:  # TypeError: an unknown setting, a value of the wrong type, no dict
            raise ValueError(f"{where} has LoRA settings this lora.py cannot read ({e})") from None


def apply_lora(model: GPT, config: LoRAConfig | None = None) -> GPT:
    """Freeze every parameter of `model`, then wrap the targeted projections of every block in
    LoRALinear (matched by exact module name, never by substring). Returns the same model."""
    config = config or LoRAConfig()
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("this model already has LoRA layers")
    model.requires_grad_(False)
    for block in model.transformer.h:
        parts_by_module: dict[str, dict[str, slice]] = {}
        for name in config.targets:
            for t in TARGETS[name]:
                size = block.get_submodule(t.module).out_features // t.n_chunks
                parts_by_module.setdefault(t.module, {})[name] = slice(t.chunk * size, (t.chunk + 1) * size)
        for module_name, parts in parts_by_module.items():
            parent_name, _, child_name = module_name.rpartition(".")
            base = block.get_submodule(module_name)
            layer = config.layer(base, parts, config)  # LoRALinear, or the variant's subclass
            setattr(block.get_submodule(parent_name), child_name, layer.train(base.training))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


# ---- merge / unmerge (§4.1: no additional inference latency) -------------------------------------


def merge_lora(model: nn.Module) -> None:
    """Fold ΔW into every adapted weight for inference. Explicit, never a side effect of eval()."""
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Take ΔW out again, recovering W0 (to fp32 rounding in fp32)."""
    for layer in lora_layers(model):
        layer.unmerge()


@contextmanager
def unmerged(model: nn.Module) -> Iterator[None]:
    """Take ΔW out while the body reads W0 or changes the active A and B; merge the (new) ΔW in
    afterwards if the model was merged. W0 itself is never reloaded (§4.1: switching tasks)."""
    was_merged = any(layer.merged for layer in lora_layers(model))
    unmerge_lora(model)
    yield
    if was_merged:
        merge_lora(model)


# ---- adapter files: safetensors with the LoRA tensors only, and JSON metadata in its header ------


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter: each adapted layer's `adapter_tensors`, keyed by their names in the model
    ('transformer.h.0.attn.c_attn.lora_A.q'), detached views of the parameters."""
    layers = [(name, m) for name, m in unwrap(model).named_modules() if isinstance(m, LoRALinear)]
    return {f"{name}.{key}": p.detach() for name, layer in layers for key, p in layer.adapter_tensors().items()}


def base_fingerprint(model: GPT) -> dict[str, list[float]]:
    """The fingerprint of the frozen base (W0 of the adapted weights; lm_head is wte), for `check_adapter_fits`."""
    raw = unwrap(model)
    with unmerged(raw), torch.no_grad():
        skip = {*lora_state_dict(raw), "lm_head.weight"}
        return weights_fingerprint({k: v for k, v in raw.state_dict().items() if k not in skip})


def save_adapter(model: GPT, path: str) -> None:
    """Write the LoRA tensors and what is needed to rebuild them onto the right base. Atomic."""
    raw = unwrap(model)
    metadata = {
        "lora_config": json.dumps(asdict(raw.lora_config)),
        "base": raw.name_or_path,
        "base_config": json.dumps(config_dict(raw.config)),
        "base_fingerprint": json.dumps(base_fingerprint(raw)),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in lora_state_dict(raw).items()}, tmp, metadata=metadata)


def read_adapter(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of an adapter file: its JSON metadata decoded, `lora_config` a LoRAConfig."""
    with open_safetensors(path) as f:
        raw_metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    missing = [k for k in ("lora_config", "base", "base_config", "base_fingerprint") if k not in raw_metadata]
    if missing:
        raise ValueError(f"{path} is not an adapter written by lora.py (no {missing[0]} in its metadata)")
    try:
        metadata = {k: json.loads(v) if k != "base" else v for k, v in raw_metadata.items()}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} has metadata that is not JSON ({e})") from None
    metadata["lora_config"] = LoRAConfig.from_dict(metadata["lora_config"], path)
    return tensors, metadata


def load_adapter(model: GPT, path: str) -> LoRAConfig:
    """Load an adapter onto `model`: injects LoRA first if the model has none. If the model is
    merged, the old adapter is unmerged and the new one merged: switching tasks on one base.
    Raises ValueError naming the mismatch for an adapter of another base, shape or config."""
    tensors, metadata = read_adapter(path)
    raw = unwrap(model)
    check_adapter_fits(raw, path, tensors, metadata)
    active = lora_state_dict(raw)
    with unmerged(raw), torch.no_grad():
        for key, tensor in tensors.items():
            active[key].copy_(tensor)  # state_dict tensors share storage with the parameters
    return metadata["lora_config"]


def check_same_base(raw: GPT, path: str, metadata: dict, fingerprint: dict[str, list[float]]) -> None:
    """That the base a file's header names (base, base_config, base_fingerprint) is this model's, whose frozen
    weights give `fingerprint`: its shape first, then its weights."""
    want, have = metadata["base_config"], config_dict(raw.config)
    diff = [f"{k} {want.get(k)} (file) vs {have[k]} (model)" for k in have if want.get(k) != have[k]]
    if diff:
        raise ValueError(f"{path} was trained on another base ({metadata['base']}): {', '.join(diff)}")
    if not same_weights(metadata["base_fingerprint"], fingerprint):
        raise ValueError(
            f"{path} was trained on base '{metadata['base']}', whose weights differ from this model's "
            f"('{raw.name_or_path}'): load the base it was trained on"
        )


def check_adapter_fits(raw: GPT, path: str, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Check that an adapter file fits this base and its LoRA (injecting LoRA if it has none)."""
    check_same_base(raw, path, metadata, base_fingerprint(raw))
    config, have = metadata["lora_config"], getattr(raw, "lora_config", None)
    if have is None:
        apply_lora(raw, config)
    elif replace(have, dropout=0.0) != replace(config, dropout=0.0):  # dropout does not change the tensors
        raise ValueError(f"{path} has LoRA {config}; the model's LoRA is {have}")
    expected = lora_state_dict(raw)
    wrong = sorted(set(tensors) ^ set(expected)) or [k for k in tensors if tensors[k].shape != expected[k].shape]
    if wrong:
        raise ValueError(f"{path} holds other LoRA tensors than this model's LoRA: {wrong[0]} differs or is missing")
