"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation", arXiv:2402.09353), a variant of LoRA's
layer: LoRA's update gives each output row of the weight its direction, and a trained magnitude m its length.

    W' = m · (W0 + (α/r)·B·A) / ‖W0 + (α/r)·B·A‖          (the norm of each output row; DoRA's eq. 5)

m starts at ‖W0‖ row by row and B at zero, so W' = W0 at step 0, as in LoRA. As the DoRA paper suggests (§4.3)
and PEFT does, the norm is a constant in the backward pass: its gradient is not computed.

    python train.py --rank 4 --variant dora

The whole variant is the class below and its line in lora.VARIANTS: its extra tensor (`lora_magnitude`, saved in
the adapter because the layer owns it), its forward, its update W' − W0, and how it merges. Everything else asks
the layer: merged and unmerged sampling, adapter files, --resume, the multi-adapter bank, Table 7's ΔW. What
cannot serve it says so in one line: §7's subspace similarity (the update is not B·A of rank r:
`update_is_low_rank`) and the PEFT export (it maps plain LoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lora import LoRAConfig, LoRALinear


class DoRALinear(LoRALinear):
    """LoRALinear whose adapted rows are rescaled to a trained length: A, B and `lora_magnitude` (d_rows) per part."""

    update_is_low_rank = False  # m rescales W0's rows too: W' − W0 is not B·A

    def __init__(self, base: nn.Linear, parts: dict[str, slice], config: LoRAConfig):
        super().__init__(base, parts, config)
        with torch.no_grad():  # m = ‖W0‖ of each output row: W' = W0 while B = 0
            norms = {name: self.weight[rows].float().norm(dim=1).to(self.weight.dtype) for name, rows in parts.items()}
        self.lora_magnitude = nn.ParameterDict({name: nn.Parameter(norm) for name, norm in norms.items()})
        self.merged_norms: dict[str, torch.Tensor] = {}  # ‖W0 + (α/r)·B·A‖ at merge time, to unmerge with

    def weight_norm(self, name: str) -> torch.Tensor:
        """‖W0 + (α/r)·B·A‖ of each output row of a part, in fp32, without gradient (a constant, DoRA §4.3).
        A and B may carry a leading batch dimension (one adapter per row of the batch): then (n, d_rows)."""
        with torch.no_grad(), torch.autocast(self.weight.device.type, enabled=False):
            update = self.scaling * (self.lora_B[name].float() @ self.lora_A[name].float())
            return (self.weight[self.parts[name]].float() + update).norm(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.weight, self.bias)  # W0·x (or W'·x once merged)
        if self.merged:
            return h
        x = self.lora_dropout(x)
        for name, rows in self.parts.items():
            scale = (self.lora_magnitude[name] / self.weight_norm(name)).unsqueeze(-2)  # m / ‖W0 + ΔW‖: (…, 1, d_rows)
            lora = self.scaling * (x @ self.lora_A[name].mT @ self.lora_B[name].mT)  # eq. 3's update, as in LoRA
            delta = (scale - 1) * F.linear(x, self.weight[rows]) + scale * lora  # W'·x − W0·x; W' is never built
            h = h + F.pad(delta.to(h.dtype), (rows.start, self.out_features - rows.stop))  # m is fp32; h stays h's
        return h

    def delta_weight(self, name: str) -> torch.Tensor:
        """W' − W0 of one part, in fp32 (d_rows × d_in). Read it while unmerged: it reads W0."""
        with torch.autocast(self.weight.device.type, enabled=False):
            W0 = self.weight[self.parts[name]].float()
            direction = W0 + super().delta_weight(name)
            return self.lora_magnitude[name].float()[:, None] * direction / direction.norm(dim=1, keepdim=True) - W0

    @torch.no_grad()
    def _add_to_weight(self, sign: float) -> None:
        """Merge: W ← W', keeping each row's norm; unmerge: W0 = W'·‖W0 + (α/r)·B·A‖/m − (α/r)·B·A (as PEFT
        does). In fp32, cast once."""
        for name, rows in self.parts.items():
            if sign > 0:
                self.merged_norms[name] = self.weight_norm(name)
                W = self.weight[rows].float() + self.delta_weight(name)
            else:
                length = self.merged_norms.pop(name) / self.lora_magnitude[name].float()
                W = self.weight[rows].float() * length[:, None] - super().delta_weight(name)
            self.weight[rows] = W.to(self.weight.dtype)
