"""Adapter layers: the baseline the LoRA paper measures itself against (§3, Table 1).

An adapter is a small bottleneck network added *in sequence* to a frozen model:

    h ← h + W_up · f(W_down · h)        W_down: (r × d), W_up: (d × r), r ≪ d

It trains few parameters, like LoRA, but its extra layers run one after the other with the rest of
the model and cannot be folded into an existing weight, so every forward pass pays for them. The
paper's Table 1 measures that cost on GPT-2 medium (+2.2% to +30.3%); `bench.py` measures it here.
Two designs, as the paper names them:

- Adapter^H (Houlsby et al., 2019): an adapter after the attention and after the MLP sublayer of
  every block, on the sublayer's output before the residual connection adds it back.
- Adapter^L (Lin et al., 2020): one adapter per block, after the MLP, whose input first goes
  through a LayerNorm.

model.py's classes are not edited: each adapted output projection (`attn.c_proj`, `mlp.c_proj`) is
replaced by `nn.Sequential(projection, adapter)`, so the adapter sees exactly what the projection
returned.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from model import GPT

# Bottleneck sizes that give GPT-2 medium (d = 1024, 24 blocks) the paper's |Θ| ≈ 11M: Table 1's
# 11M columns, and Table 3's Adapter^H 11.09M / Adapter^L 11.09M rows (ours: 11.06M and 11.09M).
HOULSBY_BOTTLENECK = 112
LIN_BOTTLENECK = 224


class Adapter(nn.Module):
    """h + W_up · f(W_down · LN(h)), the LayerNorm only for Adapter^L. W_up starts at zero, so an
    untrained adapter is the identity, as LoRA's B = 0 is."""

    def __init__(self, n_embd: int, bottleneck: int, activation: nn.Module, layer_norm: bool):
        super().__init__()
        self.ln = nn.LayerNorm(n_embd) if layer_norm else nn.Identity()
        self.down = nn.Linear(n_embd, bottleneck)
        self.activation = activation
        self.up = nn.Linear(bottleneck, n_embd)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.activation(self.down(self.ln(h))))


def _add_adapters(model: GPT, module_names: tuple[str, ...], make_adapter) -> GPT:
    """Freeze `model`, then follow each named projection of every block with a new adapter."""
    for p in model.parameters():
        p.requires_grad = False
    factory = dict(device=model.lm_head.weight.device, dtype=model.lm_head.weight.dtype)
    for block in model.transformer.h:
        for name in module_names:
            parent_name, _, child_name = name.rpartition(".")
            parent = block.get_submodule(parent_name)
            projection = getattr(parent, child_name)
            setattr(parent, child_name, nn.Sequential(projection, make_adapter().to(**factory)))
    return model


def add_houlsby_adapters(model: GPT, bottleneck: int = HOULSBY_BOTTLENECK) -> GPT:
    """Adapter^H: after the attention and after the MLP of every block (Houlsby et al. use GELU
    in adapter-bert). Returns the same model, frozen but for the adapters."""
    n_embd = model.config.n_embd
    return _add_adapters(
        model, ("attn.c_proj", "mlp.c_proj"), lambda: Adapter(n_embd, bottleneck, nn.GELU(), layer_norm=False)
    )


def add_lin_adapters(model: GPT, bottleneck: int = LIN_BOTTLENECK) -> GPT:
    """Adapter^L: after the MLP of every block, LayerNorm then a ReLU bottleneck (Lin et al.).
    Returns the same model, frozen but for the adapters."""
    n_embd = model.config.n_embd
    return _add_adapters(model, ("mlp.c_proj",), lambda: Adapter(n_embd, bottleneck, nn.ReLU(), layer_norm=True))
