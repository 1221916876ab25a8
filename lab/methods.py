"""The methods LoRA's Table 3 measures itself against (§5.1), trained through train.py's own path:

    python train.py --rank 0 --method ft-top=2 ...       # FT^Top2: only the last 2 blocks train
    python train.py --rank 0 --method adapter-h=8 ...    # Adapter^H, bottleneck 8
    python train.py --rank 0 --method adapter-l=16 ...   # Adapter^L, bottleneck 16
    python train.py --rank 0 --method prefix=8 ...       # PreLayer, 8 prefix positions

A method is NAME=SIZE. It freezes the base and puts its trainable parameters in place; the run writes
`method.safetensors` beside its checkpoint: exactly those parameters, under their names in the model, with the
method and the base (its name, shape and fingerprint) in the header, so the file says what it is and loads onto
nothing else. `python -m lab.e2e` decodes such a run; sample.py and the adapter tools refuse it in one line.

- FT^Top2 (Li & Liang, 2021): fine-tuning of the last `SIZE` transformer blocks alone, every weight, bias and
  LayerNorm in them; the embeddings, the final LayerNorm and the other blocks stay frozen. At GPT-2 M's 24
  blocks of d = 1024, 2 blocks are 25.19M parameters, the paper's figure.
- Adapter^H (Houlsby et al., 2019) and Adapter^L (Lin et al., 2020), as lab/adapter_baselines.py builds them
  for Table 1, here trained: a bottleneck of `SIZE` after each block's attention and MLP (H), or after its MLP
  with a LayerNorm first (L); the up-projection starts at zero, so the untrained model is the base.
- PreLayer, prefix-layer tuning (Li & Liang, 2021): `SIZE` learned keys and values in every block's attention,
  seen by every token before the first one (n_layer × 2 × SIZE × d parameters). The tokens keep their positions
  (0, 1, ...); Li & Liang's GPT-2 code, which passes the prefix as past keys and values, shifts them by SIZE.
  Trained directly, without their MLP reparametrisation; the KV cache and beam search hold the tokens alone,
  and the attention adds the prefix at every step.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file
from torch import nn

from lab.adapter_baselines import add_houlsby_adapters, add_lin_adapters
from lora import check_same_base
from model import GPT, KVCache, config_dict, weights_fingerprint
from utils import atomic_path, open_safetensors


def top_blocks(model: GPT, n: int) -> GPT:
    """FT^Top2 and its kin: every parameter frozen but those of the last n blocks."""
    if not 1 <= n <= model.config.n_layer:
        raise ValueError(f"ft-top={n}: the base has {model.config.n_layer} blocks; train 1 to {model.config.n_layer}")
    model.requires_grad_(False)
    for block in model.transformer.h[-n:]:
        block.requires_grad_(True)
    return model


class Prefix(nn.Module):
    """One block's prefix: l_p learned keys and values for each head, (nh, l_p, hs) each; the attention puts them
    before the first token (model.CausalSelfAttention.prefix)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = nn.Parameter(keys), nn.Parameter(values)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


@torch.no_grad()
def prefix_layers(model: GPT, length: int, seed: int = 0) -> GPT:
    """PreLayer: `length` learned keys and values in every block's attention, nothing else trained. They start
    as the keys and values the base itself computes for `length` tokens drawn with their own generator (Li &
    Liang start from real words' activations, steadier than random ones)."""
    model.requires_grad_(False)
    tokens = torch.randint(model.config.vocab_size, (1, length), generator=torch.Generator().manual_seed(seed))
    caches, training = [KVCache(length) for _ in model.transformer.h], model.training
    model.eval().hidden_states(tokens.to(model.lm_head.weight.device), caches)  # eval: no dropout, no draw
    model.train(training)
    for block, cache in zip(model.transformer.h, caches):
        block.attn.prefix = Prefix(cache.k[0].clone(), cache.v[0].clone())  # (nh, l_p, hs)
    return model


METHODS = {
    "ft-top": top_blocks,
    "adapter-h": add_houlsby_adapters,
    "adapter-l": add_lin_adapters,
    "prefix": prefix_layers,
}


def parse_method(spec: str) -> tuple[str, int]:
    """'adapter-h=8' -> ('adapter-h', 8), or one line saying what is wrong."""
    name, _, size = spec.partition("=")
    if name not in METHODS or not size.isdigit() or int(size) < 1:
        raise ValueError(f"unknown method '{spec}': give NAME=SIZE, NAME one of {', '.join(METHODS)}, SIZE >= 1")
    return name, int(size)


def apply_method(model: GPT, spec: str) -> GPT:
    """Freeze the base and put the method's trainable parameters in place; the model remembers the method and
    the names of its parameters (what method.safetensors holds). Returns the same model."""
    if getattr(model, "lora_config", None) is not None:
        raise ValueError(f"--method {spec} replaces LoRA: this model has LoRA layers")
    name, size = parse_method(spec)
    base = weights_fingerprint({key: p.detach() for key, p in model.named_parameters()})
    METHODS[name](model, size)
    model.method = spec
    model.method_tensors = [key for key, p in model.named_parameters() if p.requires_grad]
    model.base_fingerprint = {key: value for key, value in base.items() if key not in model.method_tensors}
    return model


def method_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """The method's parameters, by their names in the model."""
    parameters = dict(model.named_parameters())
    return {key: parameters[key].detach() for key in model.method_tensors}


def save_method(model: GPT, path: str) -> None:
    """method.safetensors: the method's parameters, and in the header the method and the base it trained on."""
    metadata = {
        "method": model.method,
        "base": model.name_or_path,
        "base_config": json.dumps(config_dict(model.config)),
        "base_fingerprint": json.dumps(model.base_fingerprint),
    }
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in method_state_dict(model).items()}, tmp, metadata=metadata)


def read_method(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a method.safetensors, or one line saying why it is not one."""
    with open_safetensors(path) as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if any(key not in metadata for key in ("method", "base", "base_config", "base_fingerprint")):
        raise ValueError(f"{path} is not a method file written by lab.methods (its header lacks the method or base)")
    parse_method(metadata["method"])  # a method this lab does not know is refused here
    return tensors, metadata | {k: json.loads(metadata[k]) for k in ("base_config", "base_fingerprint")}


def load_method(model: GPT, path: str) -> str:
    """Put the method of `path` on `model` (its base) and load its parameters; returns the method. An adapter of
    another base, shape or method is one ValueError naming what differs."""
    tensors, metadata = read_method(path)
    frozen = {key: p.detach() for key, p in model.named_parameters() if key in metadata["base_fingerprint"]}
    check_same_base(model, path, metadata, weights_fingerprint(frozen))  # before the method changes the model
    apply_method(model, metadata["method"])
    if tensors.keys() != set(model.method_tensors):
        raise ValueError(f"{path} holds other tensors than the method {metadata['method']} puts on this base")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for key, tensor in tensors.items():
            parameters[key].copy_(tensor)
    return metadata["method"]


def method_file(run_dir: str) -> str | None:
    """A run folder's method.safetensors, if it is the run of a method."""
    path = os.path.join(run_dir, "method.safetensors")
    return path if os.path.isfile(path) else None
