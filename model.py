"""GPT-2 in one file: the model, and loading/saving OpenAI's weights in the Hugging Face layout.

Reads top to bottom: LayerNorm'd blocks of causal self-attention and an MLP, the config, the
model, its loss computed in chunks, generation, then checkpoint I/O. Module names match Hugging
Face's GPT2LMHeadModel (`transformer.h.0.attn.c_attn`, ...) so a checkpoint maps onto it name for
name. Shapes: B batch, T time, C n_embd, nh heads, hs head size (C // nh).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch.utils.checkpoint import checkpoint

from utils import atomic_path, attention


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        # q, k and v in one fused projection, as GPT-2 stores them: c_attn.weight is (3C, C)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.dropout = config.dropout
        # None, or a module giving keys and values (nh, l_p, hs) that every token sees before the first one:
        # prefix-layer tuning (Li & Liang, 2021), a method LoRA is compared with (lab/methods.py)
        self.prefix: nn.Module | None = None

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, nh, T, hs)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if cache is not None:
            k, v = cache.append(k, v)  # (B, nh, past + T, hs): the cached tokens, then these T
        if self.prefix is not None:  # (B, nh, l_p + past + T, hs): the prefix is a past every token sees
            k, v = (torch.cat([p.expand(B, -1, -1, -1), t], dim=2) for p, t in zip(self.prefix(), (k, v)))
        past = k.size(2) - T
        # Without a past, the usual causal mask. After a past, new token i sits at position
        # past + i and sees keys 0 .. past + i: the causal mask shifted right by `past`, which for
        # the one new token of a generation step is no mask at all (it sees every key).
        mask = None
        if past > 0 and T > 1:
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past)
        # softmax(q·kᵀ/√hs)·v: F.scaled_dot_product_attention, or written out to train in bf16 on a CPU (utils)
        y = attention(q, k, v, mask, is_causal=past == 0, dropout_p=self.dropout if self.training else 0.0)
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

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # context window (Hugging Face: n_positions)
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5

    def __post_init__(self):
        sizes = {name: getattr(self, name) for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}
        bad = [f"{name} {value!r}" for name, value in sizes.items() if not isinstance(value, int) or value < 1]
        if bad:
            raise ValueError(f"GPT-2's sizes must be integers >= 1, got {', '.join(bad)}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not divisible by n_head {self.n_head}: heads split n_embd")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


# The four published sizes (Radford et al., 2019), by their Hugging Face names.
PRETRAINED = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# Hugging Face stores these four as Conv1D, weight (in, out): transposed relative to nn.Linear.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class Target:
    """A target's place in each block: a module, and which equal chunk of its rows (q is chunk 0 of 3 of c_attn)."""

    module: str
    chunk: int = 0
    n_chunks: int = 1


# The weights a LoRA (lora.py) may adapt, by the paper's names (§4.2: Wq, Wk, Wv, Wo, and the MLP's two):
# q, k and v are row chunks of the fused c_attn, in the order CausalSelfAttention splits it.
TARGETS: dict[str, tuple[Target, ...]] = {
    "q": (Target("attn.c_attn", 0, 3),),
    "k": (Target("attn.c_attn", 1, 3),),
    "v": (Target("attn.c_attn", 2, 3),),
    "o": (Target("attn.c_proj"),),
    "mlp": (Target("mlp.c_fc"), Target("mlp.c_proj")),
}


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.name_or_path = "scratch"  # where the weights came from; adapters record it
        # recompute each block's activations in the backward pass instead of keeping them: training memory
        # for about one more forward pass of arithmetic (bench.py's "activation checkpointing" row)
        self.activation_checkpointing = False
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
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        kv_caches: list[KVCache] | None = None,
        label_smoothing: float = 0.0,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, vocab), None); or with targets (B, T), (None, the mean cross-entropy over
        the targets != -1): the vocabulary projection then runs only where a loss is taken."""
        x = self.hidden_states(idx, kv_caches)
        if targets is None:
            return self.lm_head(x), None
        scored = targets != -1  # context and padding of pairs take no loss, so get no logits either
        # F.cross_entropy(self.lm_head(x[scored]), targets[scored]), a chunk of rows at a time
        loss = chunked_cross_entropy(x[scored], self.lm_head.weight, targets[scored], label_smoothing, targets.numel())
        return None, loss

    def hidden_states(self, idx: torch.Tensor, kv_caches: list[KVCache] | None = None) -> torch.Tensor:
        """The last block's output after ln_f (B, T, C), which lm_head turns into logits.
        With `kv_caches` (one per layer, see `generate`), idx continues the tokens they hold:
        its positions start after them, and its keys and values are added to them."""
        B, T = idx.shape
        past = 0 if kv_caches is None else kv_caches[0].length
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than the context ({self.config.block_size})")
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for i, block in enumerate(self.transformer.h):
            if self.activation_checkpointing and torch.is_grad_enabled() and kv_caches is None:
                x = checkpoint(block, x, use_reentrant=False)  # keeps x alone; the same dropout when recomputed
            else:
                x = block(x, None if kv_caches is None else kv_caches[i])
        return self.transformer.ln_f(x)

    # ---- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        prompt_lengths: list[int] | None = None,
        use_cache: bool = True,
    ) -> torch.Tensor:
        """Continue each row of idx (B, T) by max_new_tokens tokens; returns (B, T + max_new_tokens).
        temperature 0 is greedy decoding; top_k keeps only the k most likely tokens. Call eval() first.

        Prompts of different lengths: right-pad idx to its longest prompt and give `prompt_lengths`.
        All rows then advance together, one position a step; a row still inside its prompt takes
        its prompt's token instead of a sampled one (so no row ever sees padding, and each row gets
        exactly what it would get alone). Row b's text is its first prompt_lengths[b] +
        max_new_tokens tokens; what follows is extra and can be dropped.

        With `use_cache` (the default) the prompt is run once to fill a KV cache, then each step
        runs the model on the newest token only; use_cache=False reruns the whole window each step."""
        B, T = idx.shape
        lengths = torch.tensor(prompt_lengths or [T] * B, device=idx.device)
        if T == 0 or lengths.min() < 1:
            raise ValueError("every prompt needs at least one token")
        tokens = torch.cat([idx, idx.new_zeros(B, max_new_tokens)], dim=1)
        window = self.config.block_size
        caches = None
        for filled in range(int(lengths.min()), T + max_new_tokens):  # tokens[:, :filled] are known
            if caches is not None and caches[0].length < window:
                x = self.hidden_states(tokens[:, filled - 1 : filled], caches)  # the newest token only
            else:
                # The first step, or the window is full. GPT-2's positions are absolute: once the
                # window slides by a token, every token moves to another position and every cached
                # key and value changes, so the cache cannot be rolled; it is rebuilt from the last
                # `window` tokens (one full pass a step from then on, as without a cache).
                caches = [KVCache(window) for _ in self.transformer.h] if use_cache else None
                x = self.hidden_states(tokens[:, max(0, filled - window) : filled], caches)
            logits = self.lm_head(x[:, -1])  # (B, vocab): only the last position predicts the next token
            next_token = sample_next_token(logits.float(), temperature, top_k)
            in_prompt = filled < lengths
            tokens[:, filled] = torch.where(in_prompt, tokens[:, filled], next_token)
        return tokens

    # ---- checkpoints in the Hugging Face GPT-2 layout -------------------------------------------

    @classmethod
    def from_pretrained(cls, name_or_path: str, dropout: float = 0.0) -> GPT:
        """Load `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl` from the hub, or a local folder that
        holds `config.json` + `model.safetensors` (written by this file or by Hugging Face)."""
        config_path, weights_path = _checkpoint_files(name_or_path)
        model = cls(read_config(config_path, dropout))
        model.load_state_dict(_fit_state(_from_hf_layout(read_weights(weights_path)), model, weights_path))
        model.name_or_path = name_or_path
        return model

    def save_pretrained(self, folder: str) -> None:
        """Write `config.json` + `model.safetensors` as transformers' save_pretrained does, so this
        folder loads here and in Hugging Face tools. Each file is written atomically."""
        os.makedirs(folder, exist_ok=True)
        with atomic_path(os.path.join(folder, "config.json")) as tmp, open(tmp, "w") as f:
            json.dump(hf_config(self.config), f, indent=2)
        with atomic_path(os.path.join(folder, "model.safetensors")) as tmp:
            save_file(_to_hf_layout(self.state_dict()), tmp, metadata={"format": "pt"})


# ---- the loss, without ever holding the logits of every target at once ----------------------------
#
# F.cross_entropy(lm_head(x).float(), targets) is the plain way. At GPT-2's vocabulary it holds (n_targets,
# 50,257) logits in fp32 several times over until the backward pass (the logits, their log-softmax, the
# gradient): 206 MB each for a 4x256 batch. Here the same loss and gradients come one chunk of rows at a
# time: the loss is a scalar, so each chunk's gradient is known in the forward pass; it is kept (n_targets
# x C, small) and the chunk's logits are dropped. bench.py's "whole-batch logits" row measures the saving.

LOSS_CHUNK_ROWS = 256  # rows of logits alive at once: 256 x 50,257 in fp32 is 51 MB


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, label_smoothing, n_chunks, dtype, needs_grad):
        """Mean cross-entropy of the logits x @ weight.T (n, vocab) at targets (n,), in n_chunks chunks of
        rows; matmuls in `dtype`. The softmax (fp32 inside the kernel) is the one pass that writes each chunk's
        logits; the rest is done on the (rows, C) and (vocab, C) sides, vocab / C times smaller."""
        (n, C), vocab, eps = x.shape, weight.size(0), label_smoothing
        W = weight.to(dtype)  # once, not once per chunk
        weight_grad = needs_grad and weight.requires_grad  # not under no_grad: evaluate() of full fine-tuning
        grad_x, grad_W = [], torch.zeros_like(weight, dtype=torch.float32) if weight_grad else None
        mean_w = weight.mean(0, dtype=torch.float32)  # mean_j logit_j = x · mean_w, without a copy of weight
        x_sum, loss = x.new_zeros(C, dtype=torch.float32), x.new_zeros((), dtype=torch.float32)
        for x_c, y_c in zip(x.tensor_split(n_chunks), targets.tensor_split(n_chunks)):
            x_c = x_c.to(dtype)
            logits = x_c @ W.t()  # (rows, vocab)
            p = torch.softmax(logits, dim=-1)  # the one pass that writes (rows, vocab); two maxima read it:
            # log Σ_j exp(logit_j) = max logit - log max p, and max p >= 1/vocab never underflows
            lse = logits.amax(-1, keepdim=True).float() - p.amax(-1, keepdim=True).float().log()
            logit_y = logits.gather(1, y_c[:, None]).float()
            # as F.cross_entropy smooths: (1 - ε)·(-log p_target) + ε·mean_j(-log p_j), log p_j = logit_j - lse
            loss += (lse - (1 - eps) * logit_y - eps * (x_c.float() @ mean_w)[:, None]).sum()
            if needs_grad:  # d(loss)/d(logits) = p - (1 - ε)·onehot(target) - ε/vocab, times n: p is the big part
                grad_x.append((p @ W).float() - (1 - eps) * weight[y_c].float() - eps * mean_w)
                if grad_W is not None:
                    if dtype == torch.float32:
                        grad_W.addmm_(p.t(), x_c)  # in place: no (vocab, C) temporary per chunk
                    else:
                        grad_W += p.t() @ x_c  # half-precision product, summed in fp32
                    grad_W.index_add_(0, y_c, x_c.float(), alpha=eps - 1)
                    x_sum += x_c.float().sum(0)
        if needs_grad:
            grad_W = None if grad_W is None else grad_W.sub_(eps / vocab * x_sum).div_(n).to(weight.dtype)
            ctx.save_for_backward((torch.cat(grad_x) / n).to(x.dtype), grad_W)
        return loss / n

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_W = ctx.saved_tensors
        return grad_x * grad_loss, None if grad_W is None else grad_W * grad_loss, None, None, None, None, None


def chunked_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, positions: int = 0
) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, label_smoothing=...) for x (n, C), weight (vocab, C): the same
    value and gradients, in the autocast dtype when autocast is on. The rows go in chunks of about
    LOSS_CHUNK_ROWS, counted on `positions` (B·T, a static shape under torch.compile) when given."""
    dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
    n_chunks = max(1, (positions or x.size(0)) // LOSS_CHUNK_ROWS)
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    return ChunkedCrossEntropy.apply(x, weight, targets, label_smoothing, n_chunks, dtype, needs_grad)


# ---- generation: the KV cache and the choice of the next token ------------------------------------


class KVCache:
    """One layer's keys and values of the tokens seen so far, so that generating a token runs the
    model on that token alone instead of on the whole sequence again. The buffers are allocated
    on the first `append`, for `max_length` tokens, in the dtype and device the keys come in."""

    def __init__(self, max_length: int):
        self.max_length = max_length
        self.length = 0  # tokens held
        self.k: torch.Tensor | None = None  # (B, nh, max_length, hs)
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the keys and values (B, nh, T, hs) of T new tokens; return those of all tokens."""
        if self.k is None:
            B, nh, _, hs = k.shape
            self.k = k.new_empty(B, nh, self.max_length, hs)
            self.v = v.new_empty(B, nh, self.max_length, hs)
        start, end = self.length, self.length + k.size(2)
        self.k[:, :, start:end], self.v[:, :, start:end] = k, v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


def sample_next_token(logits: torch.Tensor, temperature: float, top_k: int | None) -> torch.Tensor:
    """One token per row from logits (B, vocab): the most likely at temperature 0, else sampled
    from softmax(logits / temperature), limited to the top_k most likely when top_k is given."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None:
        kth_best = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), num_samples=1).squeeze(1)


def hf_config(c: GPTConfig) -> dict:
    """The Hugging Face config.json of a GPTConfig: read_config's inverse."""
    return dict(
        architectures=["GPT2LMHeadModel"],
        model_type="gpt2",
        activation_function="gelu_new",
        vocab_size=c.vocab_size,
        n_positions=c.block_size,
        n_ctx=c.block_size,
        n_embd=c.n_embd,
        n_layer=c.n_layer,
        n_head=c.n_head,
        layer_norm_epsilon=c.layer_norm_epsilon,
        resid_pdrop=c.dropout,
        embd_pdrop=c.dropout,
        attn_pdrop=c.dropout,
        bos_token_id=50256,
        eos_token_id=50256,
        tie_word_embeddings=True,
    )


def read_config(path: str, dropout: float = 0.0) -> GPTConfig:
    """The GPTConfig of a Hugging Face GPT-2 config.json, or a ValueError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    required = ("vocab_size", "n_layer", "n_head", "n_embd")
    missing = [key for key in required if not isinstance(hf, dict) or key not in hf]
    if missing:
        raise ValueError(f"{path} is not a GPT-2 config: it lacks {', '.join(missing)}")
    try:
        return GPTConfig(
            block_size=hf.get("n_positions", hf.get("n_ctx", 1024)),
            vocab_size=hf["vocab_size"],
            n_layer=hf["n_layer"],
            n_head=hf["n_head"],
            n_embd=hf["n_embd"],
            dropout=dropout,
            layer_norm_epsilon=hf.get("layer_norm_epsilon", 1e-5),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a file that is not one is a ValueError naming it."""
    try:
        return load_file(path)
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None


def _fit_state(state: dict[str, torch.Tensor], model: GPT, path: str) -> dict[str, torch.Tensor]:
    """`state` if it holds exactly the model's tensors in their shapes, else a ValueError that says
    which do not fit (load_state_dict's own error is many lines)."""
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing:
        raise ValueError(f"{path} does not hold GPT-2's weights: it lacks {', '.join(missing[:3])}")
    if unexpected:
        raise ValueError(f"{path} holds tensors GPT-2 does not have: {', '.join(unexpected[:3])}")
    for key, tensor in state.items():
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, but its config.json needs "
                f"{tuple(expected[key].shape)}: the weights and the config are of different models"
            )
    return state


def _checkpoint_files(name_or_path: str) -> tuple[str, str]:
    """(config.json, model.safetensors) of a local folder, or of a hub model fetched into its cache."""
    if os.path.isdir(name_or_path):
        paths = tuple(os.path.join(name_or_path, f) for f in ("config.json", "model.safetensors"))
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"{name_or_path} is not a GPT-2 checkpoint folder: no {missing[0]}")
        return paths
    if os.path.exists(name_or_path):
        raise ValueError(f"{name_or_path} is a file, not a GPT-2 checkpoint folder (config.json + model.safetensors)")
    if os.sep in name_or_path or name_or_path.startswith("."):
        raise FileNotFoundError(
            f"{name_or_path}: no such folder (a GPT-2 checkpoint folder holds config.json and model.safetensors)"
        )
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
            "model.safetensors, or train a base from scratch (--base scratch)"
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
    if "transformer.wte.weight" in state:  # else _fit_state names it as missing
        state["lm_head.weight"] = state["transformer.wte.weight"]
    return state


def _to_hf_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        key: (tensor.t() if key.endswith(CONV1D_WEIGHTS) else tensor).contiguous()
        for key, tensor in state.items()
        if key != "lm_head.weight"  # tied: safetensors refuses shared tensors, HF re-ties it
    }


def config_dict(config: GPTConfig) -> dict:
    """The architecture fields of a config (what an adapter must match), dropout left out."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name != "dropout"}


def weights_fingerprint(state: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """A strided sample of 8 values of every tensor: enough to tell two checkpoints of one shape
    apart, even when only one block differs."""
    return {name: t.flatten()[:: max(1, t.numel() // 8)][:8].float().tolist() for name, t in state.items()}


def same_weights(fingerprint: dict[str, list[float]], other: dict[str, list[float]]) -> bool:
    """Whether two fingerprints come from the same weights, to bf16 rounding (so a bf16 copy matches)."""
    return fingerprint.keys() == other.keys() and all(
        torch.allclose(torch.tensor(fingerprint[k]), torch.tensor(other[k]), rtol=1e-2, atol=1e-3) for k in fingerprint
    )
