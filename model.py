"""GPT-2 in one file: the model, and loading/saving OpenAI's weights in the Hugging Face layout.

Reads top to bottom: LayerNorm'd blocks of causal self-attention and an MLP, the config, the
model, then checkpoint I/O. Module names match Hugging Face's GPT2LMHeadModel (`transformer.h.0.attn.
c_attn`, ...) so a checkpoint maps onto it name for name. Shapes: B batch, T time, C n_embd,
nh heads, hs head size (C // nh).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0
        # q, k and v in one fused projection, as GPT-2 stores them: c_attn.weight is (3C, C)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, nh, T, hs) -> (B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        # GPT-2 uses the tanh approximation of GELU; the exact one moves logits by ~1e-3
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # context window (Hugging Face: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5


# The four published sizes (Radford et al., 2019), by their Hugging Face names.
PRETRAINED = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# Hugging Face stores these four as Conv1D, weight (in, out): transposed relative to nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.name_or_path = "scratch"  # where the weights came from; adapters record it
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        # GPT-2 scales the residual projections by 1/sqrt(2 * n_layer) at init
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        """Parameters counted once each (the tied lm_head is the embedding): 124,439,808 for gpt2."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) and, with targets, the mean cross-entropy over targets != -1."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than the context ({self.config.block_size})")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    # ---- checkpoints in the Hugging Face GPT-2 layout -------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0) -> GPT:
        """Load `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` from the hub, or a local folder that
        holds `config.json` + `model.safetensors` (written by this file or by Hugging Face)."""
        config_path, weights_path = _checkpoint_files(name_or_path)
        with open(config_path) as f:
            hf = json.load(f)
        config = GPTConfig(
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=dropout,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
        model = cls(config)
        model.load_state_dict(_from_hf_layout(load_file(weights_path)))
        model.name_or_path = name_or_path
        return model

    def save_pretrained(self, folder: str) -> None:
        """Write `config.json` + `model.safetensors` as transformers' save_pretrained does, so this
        folder loads here and in Hugging Face tools. Each file is written atomically."""
        os.makedirs(folder, exist_ok=True)
        c = self.config
        hf_config = dict(
            architectures=["GPT2LMHeadModel"], model_type="gpt2", activation_function="gelu_new",
            vocab_size=c.vocab_size, n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd,
            n_layer=c.n_layer, n_head=c.n_head, layer_norm_epsilon=c.layer_norm_epsilon,
            resid_pdrop=c.dropout, embd_pdrop=c.dropout, attn_pdrop=c.dropout,
            bos_token_id=50256, eos_token_id=50256, tie_word_embeddings=True,
        )  # fmt: skip
        with atomic_path(os.path.join(folder, "config.json")) as tmp, open(tmp, "w") as f:
            json.dump(hf_config, f, indent=2)
        with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
            save_file(_to_hf_layout(self.state_dict()), tmp, metadata={"format": "pt"})


def _checkpoint_files(name_or_path: str) -> tuple[str, str]:
    """(config.json, model.safetensors) of a local folder, or of a hub model fetched into its cache."""
    if os.path.isdir(name_or_path):
        paths = tuple(os.path.join(name_or_path, f) for f in ("config.json", "model.safetensors"))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{name_or_path} is not a GPT-2 checkpoint folder: no {missing[0]}")
        return paths
    if name_or_path not in PRETRAINED:
        raise ValueError(
            f"unknown model '{name_or_path}': use one of {', '.join(PRETRAINED)}, "
            "or a folder holding config.json and model.safetensors"
        )
    from huggingface_hub import hf_hub_download

    try:
        repo = f"openai-community/{name_or_path}"
        return tuple(hf_hub_download(repo, f) for f in ("config.json", "model.safetensors"))
    except Exception as e:  # offline, proxy, missing cache: all end the same way for the user
        raise FileNotFoundError(
            f"could not fetch {name_or_path}'s weights from the Hugging Face hub ({type(e).__name__}). "
            "Connect once to fill the cache, pass a local folder with config.json and "
            "model.safetensors, or train a base from scratch (--init-from scratch)"
        ) from None


def _from_hf_layout(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a Hugging Face GPT-2 state dict onto ours. The hub's files name tensors `h.0.attn...`,
    transformers' save_pretrained writes `transformer.h.0.attn...`: both are accepted."""
    state = {}
    for key, tensor in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):
            continue  # causal masks stored by old checkpoints, not parameters
        if key == "lm_head.weight":
            continue  # tied to wte
        key = key if key.startswith("transformer.") else f"transformer.{key}"
        state[key] = tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor
    state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _to_hf_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: (tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
        for key, tensor in state.items()
        if key != "lm_head.weight"  # tied: safetensors refuses shared tensors, HF re-ties it
    }


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the body succeeds,
    so a crash never leaves a half-written file where a good one was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def config_dict(config: GPTConfig) -> dict:
    """The architecture fields of a config (what an adapter must match), dropout left out."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name != "dropout"}



# ---- where and in what precision to run: shared by train.py, sample.py and bench.py -------------

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; anything else is passed through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def resolve_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """The autocast dtype. 'auto': bfloat16 where CUDA supports it, else float16 (train with a
    GradScaler); float32 on the CPU, where low-precision autocast is slower than it saves."""
    if dtype == "auto":
        if not device.startswith("cuda"):
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def autocast(device: str, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision on the matmuls (weights stay fp32); a no-op context for float32."""
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)
