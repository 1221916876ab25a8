"""Small helpers the scripts share: where and in what precision to run, and files written atomically.
Nothing here knows about GPT-2 or LoRA."""

from __future__ import annotations

import argparse
import math
import os
import platform
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.nn import functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_hardware_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, dtype_use: str = "autocast") -> None:
    """--device and --dtype, worded and meaning the same in every script."""
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        help=f"{dtype_use}: auto (bfloat16 on a GPU that has it, else float16; on a CPU, bfloat16 where it has AMX "
        "or is an AMD with AVX512-BF16, else float32), float32, bfloat16, float16",
    )


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is visible, else 'cpu'; cpu, cuda, cuda:N and mps are checked
    against what torch sees, so a wrong one fails here rather than at the first tensor moved."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError:
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device '{device}': use auto, cpu, cuda, cuda:N (the N-th GPU) or mps")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"--device {device}, but CUDA is not available (torch.cuda.is_available() is False): use --device cpu"
            )
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {device}, but torch sees {torch.cuda.device_count()} GPU(s): "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {device}, but MPS is not available: use --device cpu")
    return device


def cpu_vendor(cpuinfo: str = "/proc/cpuinfo") -> str:
    """'AMD', 'Intel', or '' where the CPU's maker is not known: /proc/cpuinfo on Linux, else platform.processor()."""
    try:
        with open(cpuinfo) as f:
            text = f.read(4096)
    except OSError:
        text = platform.processor()
    return "AMD" if "AuthenticAMD" in text else "Intel" if "GenuineIntel" in text or "Intel" in text else ""


def cpu_bf16_matmul() -> str | None:
    """'AMX' or 'AVX512-BF16' where a bf16 matmul is faster than an fp32 one on this CPU, else None. AMX: always.
    AVX512-BF16 without AMX: on an AMD CPU, not on an Intel one. torch multiplies fp32 with MKL, bf16 with
    oneDNN; MKL is slow on AMD, fast on Intel. Measured on 2 cores (docs/benchmarks.md): an AMD EPYC ran a
    LoRA step of GPT-2 small 2.4x faster in bf16; an Intel Xeon with AVX512-BF16 but no AMX (hidden by its
    hypervisor) multiplied 0.16 TFLOP/s in bf16 against 0.24-0.32 in fp32, and trained the miniature 1.8x
    faster in fp32."""
    cpu = torch.cpu
    if getattr(cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() and cpu_vendor() == "AMD":
        return "AVX512-BF16"
    return None


def resolve_dtype(device: str, dtype: str = "auto") -> torch.dtype:
    """The autocast dtype. 'auto': bfloat16 where CUDA supports it, else float16 (train with a
    GradScaler); on a CPU, bfloat16 where its bf16 matmuls are the faster ones (cpu_bf16_matmul), else float32:
    without AMX or AVX512-BF16, bf16 matmuls are emulated and slower than fp32 ones."""
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if device == "cpu" and cpu_bf16_matmul() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype}': choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def describe_dtype(device: str, dtype: str) -> str:
    """The dtype --dtype picks, and why when it was 'auto': 'bfloat16 (auto: the CPU has AMX)'."""
    chosen = str(resolve_dtype(device, dtype)).removeprefix("torch.")
    if dtype != "auto":
        return chosen
    if device.startswith("cuda"):
        why = "the GPU " + ("supports" if chosen == "bfloat16" else "lacks") + " bf16"
    elif device == "cpu":
        feature = cpu_bf16_matmul()
        why = f"the CPU has {feature}" if feature else "the CPU lacks AMX and AVX512-BF16"
        if not feature and getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
            why = "AVX512-BF16 without AMX, not an AMD: fp32 matmuls are the faster ones"
    else:
        why = device
    return f"{chosen} (auto: {why})"


def autocast(device: str, dtype: torch.dtype) -> torch.autocast:
    """Mixed precision on the matmuls (weights stay fp32); a no-op context for float32."""
    return torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


def for_inference(model: nn.Module, device: str, dtype: torch.dtype) -> nn.Module:
    """The model on `device`, in eval mode, its weights cast once to `dtype` for generation: each step then
    reads 16-bit weights, where autocast would read the fp32 ones and cast them again at every step. Merge
    an adapter before (merging is done in fp32); training keeps fp32 weights under `autocast`. In float32
    on a CPU, nn.Linear's weights are stored transposed (same shape and values, other strides): decoding
    one token is a matrix-vector product per weight, and fp32 ones run faster so (`TRANSPOSED_FOR_DECODING`)."""
    model = model.to(device=device, dtype=dtype).eval()
    if device == "cpu" and dtype in TRANSPOSED_FOR_DECODING:
        for module in model.modules():
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.t().contiguous().t()  # (out, in), laid out as (in, out)
    return model


# A rule, not a timing: the two layouts sum a product in another order, so in fp32 they give other last bits,
# and a choice that changes a model's numbers must not follow the machine's load. Measured on 2 cores of an AMD
# EPYC, torch 2.13, a 50,257 x 768 product on one row: fp32 12.2 -> 6.9 ms transposed; bf16 4.2 -> 6.3 ms
# (slower, and the same bits), so bf16 keeps the stored layout (docs/benchmarks.md).
TRANSPOSED_FOR_DECODING = (torch.float32,)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float
) -> torch.Tensor:
    """softmax(q·kᵀ/√hs, masked)·v over (B, nh, T, hs), `mask` boolean (True: attend) or `is_causal`:
    F.scaled_dot_product_attention, or the same written out when training in bf16 on a CPU, up to 512 keys.
    That is a rule (device, dtype, gradients, length), never a timing: the two round bf16 scores differently
    (written out, they are rounded to bf16, as in eager attention under autocast; flash keeps them in fp32),
    so the choice changes a run's numbers, and it must be the same in a resumed run, on every DDP process and
    however busy the machine. Measured on 2 cores of an AMD EPYC (AVX512-BF16), forward and backward of
    4x12x256x64: torch's CPU flash kernel 32.6 ms, written out 19.8 ms; at 1,024 keys flash wins (38.0
    against 64.4 ms) and the written-out scores, kept for the backward pass, grow as T². Without gradients
    the winner depends on the shape (one new token over 64 keys: flash 53 µs at batch 1, written out 103
    against 453 µs at batch 10), so inference keeps flash. Under torch.compile, the compiler chooses."""
    if (
        q.device.type == "cpu"
        and q.dtype == torch.bfloat16
        and torch.is_grad_enabled()
        and k.size(-2) <= 512
        and not torch.compiler.is_compiling()
    ):
        return written_out_attention(q, k, v, mask, is_causal, dropout_p)
    # True or False spelt out: under torch.compile with dynamic shapes `past == 0` is symbolic, which the kernel
    # refuses; a branch makes the compiler specialise on it
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=True if is_causal else False, dropout_p=dropout_p
    )


def written_out_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, is_causal: bool, dropout_p: float
) -> torch.Tensor:
    """`attention` as three ops, each a fast kernel of its own: scores, softmax, the weighted sum of values."""
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5  # (B, nh, T, T_keys)
    if is_causal:
        mask = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    return F.dropout(torch.softmax(scores, dim=-1), dropout_p) @ v


def synchronize(device: str) -> None:
    """Wait for the GPU, so that a timer measures the work and not its queueing."""
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def read_text(path: str, flag: str) -> str:
    """A UTF-8 text file given on the command line as `flag` (e.g. "--input "), or one line saying what is wrong."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{flag}{path}: {'a folder, not a file' if os.path.isdir(path) else 'no such file'}")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{flag}{path} is not UTF-8 text ({e.reason} at byte {e.start}): convert it") from None
    if not text.strip():
        raise ValueError(f"{flag}{path} is empty")
    return text


def parameter_summary(model: nn.Module) -> str:
    """'trainable 147,456 / total 124,587,264 (0.12%)'; tied weights counted once."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} / total {total:,} ({100 * trainable / total:.2f}%)"


def unwrap(model: nn.Module) -> nn.Module:
    """The model under torch.compile's `_orig_mod` and DDP's `module`, so saved keys carry neither."""
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    return model


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside `path`; rename it onto `path` only if the body succeeds,
    so a crash never leaves a half-written file where a good one was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors creates files 0600; give them the usual mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextmanager
def open_safetensors(path: str) -> Iterator:
    """safetensors' safe_open, with a file that is not safetensors at all reported as a ValueError
    naming it (safetensors raises its own exception type, which callers would not expect)."""
    try:
        with safe_open(path, framework="pt") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path} is not a safetensors file ({e})") from None
