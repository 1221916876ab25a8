"""bench.py: the LoRA paper's efficiency claims, measured where you run it.

The paper claims (Hu et al., 2021):
- §4.1 and Table 1: adapters add inference latency (+2.2% to +30.3% on GPT-2 medium), while LoRA,
  merged into W = W0 + B·A, adds none.
- §4.2 "Practical Benefits": on GPT-3 175B, LoRA cuts training memory from 1.2 TB to 350 GB (3×),
  the checkpoint from 350 GB to 35 MB (10,000×), and trains 25% faster.

Three tables measure them, each row against its reference:
- inference: one forward pass without gradients, per (batch, seq) shape, for the base model
  (= a fully fine-tuned model), merged LoRA, unmerged LoRA, and the adapter baselines Adapter^H and
  Adapter^L (lab/adapter_baselines.py);
  median, min and max over trials after a warm-up; the reference is the base.
- decoding: what serving a merged adapter costs a token, greedy at batch 1: tokens/s of ours, of
  transformers' generate with `--peers`, and of the floor, the model's matrix-vector products alone;
  the reference is ours.
- training: full fine-tuning vs LoRA (r=4 on q,v; r=4 on every target) on one batch of random
  tokens: trainable parameters, optimizer state, step time, tokens/s, model FLOP/s and its share of
  the measured matmul peak, checkpoint size, and peak memory: of tensors, as the paper counts it (GPU
  memory), and on a CPU also the process's resident set (its runtime and allocator included, counted
  from the first step); each configuration in a fresh process, so its peaks are its own; the
  reference is full fine-tuning. `--peers` adds Hugging Face GPT-2 with full fine-tuning and with
  PEFT's LoRA.
Several adapters in one batch are the lab's (lab/multi_adapter.py); `python -m lab.bench_mixed` measures
them with this file's timing and rows.

Weights are random (latency and memory do not depend on their values) unless --size is a folder.
Writes OUT/results.json (one row per measurement), prints markdown tables, and draws OUT/bench.png
when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from lab.adapter_baselines import add_houlsby_adapters, add_lin_adapters
from lora import TARGETS, LoRAConfig, apply_lora, merge_lora, save_adapter
from model import GPT, PRETRAINED, hf_config
from train import freeze_base_in
from utils import (
    add_hardware_flags,
    atomic_path,
    autocast,
    for_inference,
    resolve_device,
    resolve_dtype,
    synchronize,
)

LORA_RANK = 4  # alpha 8, lora.py's default

# Table 1 of the paper: latency overhead (%) of the adapters over the base, GPT-2 medium, per (batch, seq).
PAPER_TABLE1 = {
    (32, 512): {"Adapter^L": 2.2, "Adapter^H": 3.0},
    (16, 256): {"Adapter^L": 5.0, "Adapter^H": 8.4},
    (1, 128): {"Adapter^L": 20.7, "Adapter^H": 30.3},
}
# §4.2 on GPT-3 175B: what LoRA (r=4, q,v) gives relative to full fine-tuning.
PAPER_TRAINING = {"peak memory": 1.2e12 / 350e9, "checkpoint": 350e9 / 35e6, "tokens/s": 1.25}

# Defaults per device: a CPU run finishes in a few minutes on 2 cores; on a GPU, the paper's shapes.
DEFAULTS = {
    "cpu": dict(size="gpt2", shapes="1x128,4x256", train_shape="2x128", trials=5, warmup=1),
    "cuda": dict(size="gpt2-medium", shapes="32x512,16x256,1x128", train_shape="8x512", trials=20, warmup=5),
}


# ---- timing and models ----------------------------------------------------------------------------


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of `fn` takes; on CUDA, waits for the kernels it queued."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def build_model(size: str, device: str) -> GPT:
    """A GPT-2 of a published size with random weights (no download), or the checkpoint in a folder."""
    if size in PRETRAINED:
        with torch.device(device):  # initialise on the device: fast on a GPU
            return GPT(PRETRAINED[size])
    return GPT.from_pretrained(size).to(device)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def reset_peak_memory(device: str) -> None:
    """Start the peak afresh, so that it measures training and not building the model: on a CPU, a
    16-bit base is made in fp32 and cast, and that moment's fp32 copy would otherwise be the peak.
    On Linux, writing 5 to /proc's clear_refs resets VmHWM; elsewhere the peak keeps the setup's."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_tensor_bytes(step: Callable[[], object], alive: list[torch.Tensor], device: str) -> int:
    """The most bytes held by tensors during one call of `step`, as the paper counts memory: the `alive`
    tensors (weights, optimizer state), plus the peak of what the step allocates on top. On a GPU,
    torch.cuda.max_memory_allocated; on a CPU, torch.profiler's allocation events (their running total
    starts at zero with the profiler). Neither counts the runtime or memory the allocator keeps."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        timed(step, device)
        return torch.cuda.max_memory_allocated(device)
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}  # tied weights once
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profiler:
        step()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "trace.json")
        profiler.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    allocated = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return sum(storages.values()) + max([0, *allocated])


def peak_resident_bytes() -> int:
    """This process's peak resident memory since exec or `reset_peak_memory`. On Linux, /proc's VmHWM:
    ru_maxrss (the fallback) cannot be reset, and a spawned child would report its parent's peak."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):  # not Linux: ru_maxrss, in bytes on macOS
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def describe_device(device: str) -> str:
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"cpu ({cpu}, {torch.get_num_threads()} threads)"


def row(
    args: argparse.Namespace,
    table: str,
    what: str,
    metric: str,
    unit: str,
    values: list[float],
    reference: str,
    **context,
) -> dict:
    """One measurement as results.json stores it: where it was measured, and median, min and max of its n values."""
    dtype = str(resolve_dtype(args.device, args.dtype)).removeprefix("torch.")
    measured = dict(median=statistics.median(values), min=min(values), max=max(values), n=len(values))
    where = dict(model=args.size, device=args.device_name, dtype=dtype)
    return dict(table=table, what=what, metric=metric, unit=unit, reference=reference, **where, **context, **measured)


def add_ratios(rows: list[dict]) -> list[dict]:
    """ratio = median / the median of the row's reference (same table, metric and shape); None when the
    reference was not measured (--train-runs without full)."""
    reference = {(r["table"], r["metric"], r["shape"]): r["median"] for r in rows if r["what"] == r["reference"]}
    for r in rows:
        key = (r["table"], r["metric"], r["shape"])
        r["ratio"] = r["median"] / reference[key] if key in reference else None
    return rows


# ---- inference latency (the paper's Table 1) ------------------------------------------------------

BASE = "base (= full FT)"


def inference_variants(base: GPT) -> dict[str, nn.Module]:
    """The models of Table 1, all from copies of one base. Merged LoRA runs exactly the base's
    kernels (§4.1); unmerged LoRA and the adapters add layers that run in sequence."""
    merged = apply_lora(copy.deepcopy(base), LoRAConfig(LORA_RANK))
    merge_lora(merged)
    return {
        BASE: base,
        "LoRA merged": merged,
        "LoRA unmerged": apply_lora(copy.deepcopy(base), LoRAConfig(LORA_RANK)),
        "Adapter^H": add_houlsby_adapters(copy.deepcopy(base)),
        "Adapter^L": add_lin_adapters(copy.deepcopy(base)),
    }


@torch.no_grad()
def inference_rows(args: argparse.Namespace) -> list[dict]:
    """Median/min/max latency of one forward pass per model and shape. The weights are cast to
    --dtype, as a model is served. Trials go round-robin over the models, so a slow spell of a
    shared machine hits every model alike rather than one."""
    device, dtype = args.device, resolve_dtype(args.device, args.dtype)
    torch.manual_seed(0)
    base = build_model(args.size, device).to(dtype).eval()
    variants = inference_variants(base)
    rows = []
    for batch, seq in args.shapes:
        x = torch.randint(base.config.vocab_size, (batch, seq), device=device)
        for model in variants.values():
            for _ in range(args.warmup):
                model(x)
        seconds = {name: [] for name in variants}
        for _ in tqdm(range(args.trials), desc=f"inference {batch}x{seq}", leave=False):
            for name, model in variants.items():
                seconds[name].append(timed(lambda: model(x), device))
        for name, model in variants.items():
            params = base.num_parameters() if name == BASE else trainable_parameters(model)
            values = [1000 * s for s in seconds[name]]
            rows.append(
                row(args, "inference", name, "latency", "ms", values, BASE, shape=f"{batch}x{seq}", params=params)
            )
    return rows


# ---- decoding: one token at a time ----------------------------------------------------------------

OURS = "ours (model.generate)"
COMPILED = "ours, torch.compile"
DECODE_PROMPT = 16  # prompt tokens before the timed new ones


def decode_floor(model: nn.Module) -> Callable[[], object]:
    """A token's worth of the model's matrix-vector products and nothing else: every nn.Linear on one
    row (the 4 of each block and lm_head, 124M weights read once at GPT-2 small), in the weights' dtype.
    Reading the weights is what bounds decoding at batch 1; a decoder is as fast only with no overhead."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    rows = [m.weight.new_zeros(1, m.in_features).normal_() for m in linears]

    def token():
        for m, x in zip(linears, rows):
            F.linear(x, m.weight, m.bias)

    return token


def hf_decoder(model: GPT, dtype: torch.dtype) -> Callable[[torch.Tensor, int], torch.Tensor]:
    """transformers' GPT2LMHeadModel with the same weights in `dtype`, greedy, exactly n new tokens."""
    import transformers

    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).to(model.lm_head.weight.device).eval()

    def generate(x, n):
        return hf.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0
        )

    return generate


@torch.no_grad()
def decoding_rows(args: argparse.Namespace) -> list[dict]:
    """Tokens/s of greedy decoding at batch 1 on weights cast once to --dtype (as sample.py decodes): ours,
    ours under torch.compile with --compile, transformers' with --peers, and the floor of the model's
    matrix-vector products alone. Round-robin trials, as for latency."""
    device, dtype, n = args.device, resolve_dtype(args.device, args.dtype), args.decode_tokens
    torch.manual_seed(0)
    model = build_model(args.size, device).eval()
    contenders = {}
    if args.peers:
        contenders["transformers (generate)"] = hf_decoder(model, dtype)  # from the fp32 weights, as ours
    for_inference(model, device, dtype)
    contenders[OURS] = lambda x, n: model.generate(x, n, temperature=0)
    x = torch.randint(model.config.vocab_size, (1, DECODE_PROMPT), device=device)
    compile_seconds = {}
    if args.compile:  # the blocks compiled, for any number of cached tokens: generate calls hidden_states a step
        compiled = copy.deepcopy(model)
        compiled.hidden_states = torch.compile(compiled.hidden_states, dynamic=True, fullgraph=True)
        compile_seconds[COMPILED] = timed(lambda: compiled.generate(x, 2, temperature=0), device)
        contenders[COMPILED] = lambda x, n: compiled.generate(x, n, temperature=0)
    token = decode_floor(model)
    contenders["floor: its matrix-vector products"] = lambda x, n: [token() for _ in range(n)]
    for decode in contenders.values():
        for _ in range(args.warmup):
            decode(x, 8)
    seconds = {name: [] for name in contenders}
    for _ in tqdm(range(args.trials), desc=f"decoding {n} tokens", leave=False):
        for name, decode in contenders.items():
            seconds[name].append(timed(lambda: decode(x, n), device))
    shape = f"1x{DECODE_PROMPT}+{n}"
    return [
        row(args, "decoding", name, "tokens/s", "tokens/s", [n / s for s in seconds[name]], OURS, shape=shape)
        | ({"compile_s": compile_seconds[name]} if name in compile_seconds else {})
        for name in contenders
    ]


# ---- training efficiency (§4.2) ---------------------------------------------------------------------

FULL = "full FT"


@dataclass(frozen=True)
class TrainingRun:
    key: str  # its name for --train-runs
    what: str
    library: str  # "ours" (model.py + lora.py) or "hf" (transformers' GPT2LMHeadModel, + PEFT for LoRA)
    targets: tuple[str, ...] = ()  # lora.py's target names; none = full fine-tuning
    loss_share: float = 1.0  # the last share of each row takes a loss, as the targets of context→target pairs
    whole_logits: bool = False  # the plain loss, F.cross_entropy on every position's logits, not chunked
    checkpointing: bool = False  # activation checkpointing: each block recomputed in the backward pass


TRAINING_RUNS = [
    TrainingRun("full", FULL, "ours"),
    TrainingRun("lora-qv", f"LoRA r={LORA_RANK} q,v", "ours", ("q", "v")),
    # what model.chunked_cross_entropy saves: the same step with the (B·T, vocab) logits held whole
    TrainingRun("lora-qv-logits", f"LoRA r={LORA_RANK} q,v, whole-batch logits", "ours", ("q", "v"), whole_logits=True),
    # pairs (E2E): no vocabulary projection where no loss is taken; E2E's targets are ~45% of its tokens
    TrainingRun("lora-qv-half", f"LoRA r={LORA_RANK} q,v, loss on half", "ours", ("q", "v"), loss_share=0.5),
    TrainingRun(
        "lora-qv-ckpt", f"LoRA r={LORA_RANK} q,v, activation checkpointing", "ours", ("q", "v"), checkpointing=True
    ),
    TrainingRun("lora-all", f"LoRA r={LORA_RANK} all", "ours", tuple(TARGETS)),
    TrainingRun("hf-full", "HF full FT", "hf"),
    TrainingRun("peft-qv", f"HF+PEFT LoRA r={LORA_RANK} c_attn", "hf", ("q", "v")),
    TrainingRun("peft-all", f"HF+PEFT LoRA r={LORA_RANK} all", "hf", tuple(TARGETS)),
]


def training_runs(peers: bool, keys: list[str] | None = None) -> list[TrainingRun]:
    """The runs named by --train-runs; else ours, and the peers' with --peers."""
    if keys:
        return [run for run in TRAINING_RUNS if run.key in keys]
    return [run for run in TRAINING_RUNS if peers or run.library == "ours"]


def our_setup(run: TrainingRun, size: str, device: str, dtype: torch.dtype):
    """(model, loss of a batch, save a checkpoint into a folder) for model.py + lora.py; as train.py
    does, LoRA's frozen base is stored in the autocast dtype when that is a 16-bit one."""
    model = build_model(size, device)
    model.activation_checkpointing = run.checkpointing
    if run.targets:
        apply_lora(model, LoRAConfig(LORA_RANK, targets=run.targets))
        freeze_base_in(model, dtype)

        def save(folder):
            save_adapter(model, os.path.join(folder, "adapter.safetensors"))
    else:
        save = model.save_pretrained

    def loss_of(x: torch.Tensor) -> torch.Tensor:  # targets = inputs: only the loss's cost matters here
        targets = x.clone()
        targets[:, : round(x.size(1) * (1 - run.loss_share))] = -1  # the context: no loss, no logits
        if run.whole_logits:
            logits, _ = model(x)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1)
        return model(x, targets)[1]

    return model, loss_of, save


def peer_setup(run: TrainingRun, size: str, device: str, dtype: torch.dtype):
    """The same for Hugging Face GPT-2 and PEFT. PEFT adapts whole modules: it cannot give q and v
    of the fused c_attn their own A and B, so q,v becomes LoRA on all of c_attn (q, k and v under
    one A and one B: at r=4 the same parameter count, 12,288 per block at d=768, but k adapted too).
    Its weights stay fp32 under the same autocast: PEFT's own recipe (`dtype` is unused)."""
    import transformers

    transformers.logging.set_verbosity_error()  # its config warnings and progress bars, not ours
    transformers.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)  # PEFT calling transformers' deprecated API
    c = PRETRAINED[size] if size in PRETRAINED else GPT.from_pretrained(size).config
    config = transformers.GPT2Config(**hf_config(c))  # the dropouts are 0, as in ours
    with torch.device(device):
        model = transformers.GPT2LMHeadModel(config)
    if run.targets:
        import peft

        modules = sorted({where.module for t in run.targets for where in TARGETS[t]})  # e.g. attn.c_attn
        lora_config = peft.LoraConfig(
            r=LORA_RANK, lora_alpha=LoRAConfig().alpha, lora_dropout=0.0, target_modules=modules, fan_in_fan_out=True
        )
        model = peft.get_peft_model(model, lora_config)
    return model, lambda x: model(input_ids=x, labels=x).loss, model.save_pretrained


def measure_training(
    run: TrainingRun, size: str, shape: tuple[int, int], device: str, dtype_name: str, warmup: int, trials: int
) -> dict[str, list[float]]:
    """Train `run` for warmup + trials steps of AdamW on random tokens; runs in its own process."""
    torch.manual_seed(0)
    dtype = resolve_dtype(device, dtype_name)
    model, loss_of, save = (our_setup if run.library == "ours" else peer_setup)(run, size, device, dtype)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.startswith("cuda"))
    batch, seq = shape
    x = torch.randint(model.config.vocab_size, (batch, seq), device=device)
    reset_peak_memory(device)

    def step():
        with autocast(device, dtype):  # no GradScaler for float16: these steps are timed, not trained
            loss = loss_of(x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    seconds = [timed(step, device) for _ in range(trials)]
    resident = peak_resident_bytes()  # over the steps above: the process, its runtime and allocator included
    state = [t for values in optimizer.state.values() for t in values.values() if torch.is_tensor(t)]
    peak_memory = peak_tensor_bytes(step, [*model.parameters(), *model.buffers(), *state], device)  # one more step
    optimizer_bytes = sum(t.numel() * t.element_size() for t in state)
    with tempfile.TemporaryDirectory() as folder:
        save(folder)
        checkpoint_bytes = sum(
            os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors")
        )
    # model FLOPs per token: 2·N forward, 2·N for the activations' gradients, 2·N more for the
    # weights' gradients in full fine-tuning (LoRA's A and B: negligible); N = every weight
    flops_per_token = (4 if run.targets else 6) * sum(p.numel() for p in model.parameters())
    return {
        "step time": [1000 * s for s in seconds],
        "tokens/s": [batch * seq / s for s in seconds],
        "model FLOP/s": [flops_per_token * batch * seq / s for s in seconds],
        "trainable params": [trainable_parameters(model)],
        "optimizer state": [optimizer_bytes],
        "peak memory": [peak_memory],
        **({} if device.startswith("cuda") else {"peak resident": [resident]}),
        "checkpoint": [checkpoint_bytes],
    }


UNITS = {
    "step time": "ms",
    "tokens/s": "tokens/s",
    "model FLOP/s": "FLOP/s",
    "of matmul peak": "%",
    "trainable params": "",
    "optimizer state": "B",
    "peak memory": "B",
    "peak resident": "B",
    "checkpoint": "B",
}


def matmul_peak(device: str, dtype: torch.dtype, n: int, trials: int) -> float:
    """The FLOP/s of this device's best case, a large square matmul in `dtype` (median of trials), in
    the faster of its two layouts, a @ b and a @ b.T (nn.Linear's: ten times faster for bf16 on a CPU
    without AMX): the limit a training step's model FLOP/s is measured against."""
    generator = torch.Generator(device).manual_seed(0)  # its own: a probe never shifts the global generator's draws
    a, b = (torch.randn(n, n, device=device, dtype=dtype, generator=generator) for _ in range(2))
    best = 0.0
    for product in (lambda: a @ b, lambda: a @ b.t()):
        for _ in range(2):
            product()
        seconds = [timed(product, device) for _ in range(max(trials, 5))]
        best = max(best, 2 * n**3 / statistics.median(seconds))
    return best


def training_rows(args: argparse.Namespace) -> list[dict]:
    """One fresh process per configuration (spawned, so CUDA works in it and no memory is shared), --rounds
    times round-robin, their steps pooled: a slow spell of a shared machine then hits every configuration."""
    shape = "x".join(map(str, args.train_shape))
    dtype = resolve_dtype(args.device, args.dtype)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # hand the inference models' memory back before the children need it
    n = 4096 if args.device.startswith("cuda") else 2048
    runs, peak = training_runs(args.peers, args.train_runs), 0.0
    measured = {run: {} for run in runs}
    for _ in tqdm(range(args.rounds), desc="training rounds", leave=False):
        peak = max(peak, matmul_peak(args.device, dtype, n, args.trials))  # the best case over the rounds
        for run in tqdm(runs, desc="training", leave=False):
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                result = pool.submit(
                    measure_training,
                    run,
                    args.size,
                    args.train_shape,
                    args.device,
                    args.dtype,
                    args.warmup,
                    args.trials,
                ).result()
            for metric, values in result.items():
                measured[run].setdefault(metric, []).extend(values)
    rows = []
    for run in runs:
        measured[run]["of matmul peak"] = [100 * flops / peak for flops in measured[run]["model FLOP/s"]]
        for metric, values in measured[run].items():
            context = dict(shape=shape, matmul_peak=peak, matmul_size=n, rounds=args.rounds)
            rows.append(row(args, "training", run.what, metric, UNITS[metric], values, FULL, **context))
    return rows


# ---- output: markdown tables, results.json, chart ---------------------------------------------------


def human(value: float, unit: str) -> str:
    if unit == "B":
        for prefix, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if value >= scale:
                return f"{value / scale:.3g} {prefix}"
        return f"{value:.0f} B"
    if unit == "":
        return f"{value / 1e6:.3g}M" if value >= 1e5 else f"{value:,.0f}"
    if unit == "FLOP/s":
        return f"{number(value / 1e12)} TFLOP/s"
    if unit == "%":
        return f"{value:.3g}%"
    return f"{number(value)} {unit}".replace("tokens/s", "tok/s")


def number(value: float) -> str:
    """1,449.4 / 19.8 / 0.481: four or so significant digits, never an exponent."""
    return f"{value:,.1f}" if value >= 10 else f"{value:.3g}"


def latency_table(rows: list[dict]) -> str:
    """Models down, shapes across: median [min–max], and the overhead over the reference (with
    the paper's Table 1 figure where the shape is one of its)."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    names = list(dict.fromkeys(r["what"] for r in rows))
    cells = {(r["what"], r["shape"]): r for r in rows}
    lines = ["| | \\|Θ\\| | " + " | ".join(f"{s} (ms)" for s in shapes) + " |", "|---|---:|" + "---:|" * len(shapes)]
    for name in names:
        out = []
        for shape in shapes:
            r = cells[(name, shape)]
            cell = f"{number(r['median'])} [{number(r['min'])}–{number(r['max'])}]"
            if name != r["reference"]:
                cell += f" {100 * (r['ratio'] - 1):+.1f}%"
            paper = PAPER_TABLE1.get(tuple(int(n) for n in shape.split("x")), {}).get(name)
            if paper is not None:
                cell += f" (paper +{paper}%)"
            out.append(cell)
        params = cells[(name, shapes[0])]["params"]
        lines.append(f"| {name} | {human(params, '')} | " + " | ".join(out) + " |")
    return "\n".join(lines)


def training_table(rows: list[dict]) -> str:
    """Configurations down, metrics across: each value with its ratio to full fine-tuning."""
    cells = {(r["what"], r["metric"]): r for r in rows}
    metrics = [m for m in UNITS if any(metric == m for _, metric in cells)]  # no resident set on a GPU
    names = list(dict.fromkeys(r["what"] for r in rows))
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for name in names:
        out = [human(cells[name, m]["median"], UNITS[m]) for m in metrics]
        ratios = [cells[name, m]["ratio"] if m != "of matmul peak" else None for m in metrics]
        out = [f"{v} (×{ratio:.3g})" if ratio is not None else v for v, ratio in zip(out, ratios)]
        lines.append(f"| {name} | " + " | ".join(out) + " |")
    peak = rows[0]["matmul_peak"]
    lines.append(
        f"\nmatmul peak: {human(peak, 'FLOP/s')} (a {rows[0]['matmul_size']}² matmul in {rows[0]['dtype']}); model FLOP/s "
        "counts 4·N a token for LoRA (forward, activations' gradients), 6·N for full fine-tuning"
    )
    lora = f"LoRA r={LORA_RANK} q,v"
    if (lora, "checkpoint") in cells and (FULL, "checkpoint") in cells:
        memory, checkpoint, speed = (cells[lora, m]["ratio"] for m in ("peak memory", "checkpoint", "tokens/s"))
        lines.append(
            f"\n{lora} vs full fine-tuning: peak memory ÷{1 / memory:.3g} (paper, GPT-3 175B: "
            f"÷{PAPER_TRAINING['peak memory']:.2g}), checkpoint ÷{1 / checkpoint:,.0f} "
            f"(paper: ÷{PAPER_TRAINING['checkpoint']:,.0f}), tokens/s ×{speed:.3g} (paper: ×{PAPER_TRAINING['tokens/s']})"
        )
    peft = f"HF+PEFT LoRA r={LORA_RANK} c_attn"
    if (lora, "tokens/s") in cells and (peft, "tokens/s") in cells:
        ours, theirs = cells[lora, "tokens/s"]["median"], cells[peft, "tokens/s"]["median"]
        lines.append(f"{lora} vs {peft}: tokens/s ×{ours / theirs:.3g}")
    return "\n".join(lines)


def decoding_table(rows: list[dict]) -> str:
    """Decoders down: tokens/s median [min–max], ms a token, and ours against each."""
    lines = ["| | tokens/s | ms a token | ours ÷ this |", "|---|---:|---:|---:|"]
    for r in rows:
        cell = f"{number(r['median'])} [{number(r['min'])}–{number(r['max'])}]"
        ours = "" if r["what"] == r["reference"] else f"×{1 / r['ratio']:.3g}"
        what = r["what"] + (f" (+{r['compile_s']:.0f} s to compile)" if "compile_s" in r else "")
        lines.append(f"| {what} | {cell} | {number(1000 / r['median'])} | {ours} |")
    return "\n".join(lines)


def markdown(rows: list[dict], formats: dict[str, Callable[[list[dict]], str]] | None = None) -> str:
    """Every table of `rows`, each with the model, shape(s), device and dtype it was measured on."""
    parts = []
    for table, format_table in (
        formats or {"inference": latency_table, "decoding": decoding_table, "training": training_table}
    ).items():
        table_rows = [r for r in rows if r["table"] == table]
        if table_rows:
            r = table_rows[0]
            shapes = ", ".join(dict.fromkeys(t["shape"] for t in table_rows))
            parts.append(
                f"### {table}: {r['model']}, {shapes}, {r['device']}, {r['dtype']}\n\n{format_table(table_rows)}"
            )
    return "\n\n".join(parts)


def write_results(rows: list[dict], path: str, command: str) -> None:
    """A JSON file of every row, with the command that measured them and torch's version."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(dict(command=command, torch=torch.__version__, rows=rows), f, indent=1)


def chart(rows: list[dict], path: str) -> bool:
    """Latency overhead per shape, and training ratios to full fine-tuning; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, table, metrics in (
        (axes[0], "inference", ["latency"]),
        (axes[1], "training", ["tokens/s", "peak memory"]),
    ):
        table_rows = [r for r in rows if r["table"] == table and r["metric"] in metrics and r["what"] != r["reference"]]
        if not table_rows:  # that table was skipped
            ax.set_visible(False)
            continue
        groups = list(dict.fromkeys(r["shape"] if table == "inference" else r["metric"] for r in table_rows))
        names = list(dict.fromkeys(r["what"] for r in table_rows))
        width = 0.8 / max(len(names), 1)
        for i, name in enumerate(names):
            values = [
                next((r["ratio"] for r in table_rows if r["what"] == name and g in (r["shape"], r["metric"])), None)
                or math.nan
                for g in groups
            ]
            ax.bar([j + i * width for j in range(len(groups))], values, width, label=name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
        ax.set_ylabel(f"ratio to {BASE if table == 'inference' else FULL}")
        ax.set_title(table)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return True


# ---- command line -------------------------------------------------------------------------------------


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """'1x128,4x256' -> [(1, 128), (4, 256)]."""
    shapes = []
    for part in text.split(","):
        batch, _, seq = part.strip().partition("x")
        if not (batch.isdigit() and seq.isdigit() and int(batch) > 0 and int(seq) > 0):
            raise ValueError(f"bad shape '{part}': write batch x sequence length, like 4x256")
        shapes.append((int(batch), int(seq)))
    return shapes


def add_model_flags(parser: argparse.ArgumentParser, dtype_use: str) -> None:
    """--size, --device and --dtype, as bench.py and the lab's benchmarks read them."""
    size_help = (
        "the GPT-2 to measure: gpt2, gpt2-medium, gpt2-large, gpt2-xl in that size with random weights "
        "(no download), or a checkpoint folder"
    )
    parser.add_argument("--size", help=size_help)
    add_hardware_flags(parser, dtype_use)


def check_model_flags(args: argparse.Namespace, defaults: dict[str, dict]) -> None:
    """Resolve --device, fill the flags left unset from defaults["cpu"] or ["cuda"], refuse an unknown
    --size or --dtype now rather than after minutes of work, and name the device for the tables."""
    args.device = resolve_device(args.device)  # refuses cuda where torch sees no GPU
    for name, value in defaults["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.size not in PRETRAINED and not os.path.isdir(args.size):
        raise ValueError(f"unknown --size '{args.size}': use one of {', '.join(PRETRAINED)} or a checkpoint folder")
    resolve_dtype(args.device, args.dtype)
    args.device_name = describe_device(args.device)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Measure the LoRA paper's efficiency claims: adapter vs LoRA inference latency "
        "(Table 1) and LoRA vs full fine-tuning training memory, speed and checkpoint size (§4.2).",
        epilog="Defaults depend on the device. CPU: gpt2, shapes 1x128,4x256, training 2x128, 5 trials "
        "(a few minutes on 2 cores). CUDA: gpt2-medium, the paper's shapes 32x512,16x256,1x128, training "
        "8x512, 20 trials, bf16 (estimated at 2 to 3 minutes on an H100). Example: python bench.py --peers --out bench-out",
    )
    add_model_flags(parser, "inference casts the weights to it, training runs under its autocast")
    parser.add_argument("--shapes", help="inference shapes, batch x sequence length, comma-separated: 1x128,4x256")
    parser.add_argument("--train-shape", help="the training batch, batch x sequence length: 2x128")
    parser.add_argument("--trials", type=int, help="timed forward passes / training steps per measurement")
    parser.add_argument("--warmup", type=int, help="untimed ones before them")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run the training configurations this many times, round-robin, pooled"
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="also train Hugging Face GPT-2 with full fine-tuning and with PEFT LoRA, and decode with transformers",
    )
    keys = ", ".join(run.key for run in TRAINING_RUNS)
    parser.add_argument("--train-runs", help=f"only these training rows, comma-separated, of: {keys}")
    parser.add_argument("--skip-inference", action="store_true", help="leave out the latency table")
    parser.add_argument("--skip-decoding", action="store_true", help="leave out the decoding table")
    parser.add_argument("--skip-training", action="store_true", help="leave out the training table")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also decode with the blocks under torch.compile (its compile time shown)",
    )
    parser.add_argument("--decode-tokens", type=int, default=128, help="new tokens a timed decode (batch 1) makes")
    parser.add_argument("--out", default="bench-out", help="folder for results.json and bench.png")
    args = parser.parse_args(argv)
    check_model_flags(args, DEFAULTS)
    if min(args.trials, args.decode_tokens, args.rounds) < 1 or args.warmup < 0:
        raise ValueError("--trials, --decode-tokens and --rounds must be >= 1, --warmup >= 0")
    args.shapes, (args.train_shape,) = parse_shapes(args.shapes), parse_shapes(args.train_shape)
    if args.train_runs is not None:
        args.train_runs = [key.strip() for key in args.train_runs.split(",")]
        unknown = [key for key in args.train_runs if key not in {run.key for run in TRAINING_RUNS}]
        if unknown or not args.train_runs:
            raise ValueError(f"unknown --train-runs '{', '.join(unknown)}': choose from {keys}")
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    """Run the benchmarks, print the tables, write OUT/results.json; returns its rows."""
    args = parse_args(argv)
    rows = []
    if not args.skip_inference:
        rows += inference_rows(args)
    if not args.skip_decoding:
        rows += decoding_rows(args)
    if not args.skip_training:
        rows += training_rows(args)
    # Another table is one more function returning rows (with a reference row) and, in markdown(), its format.
    add_ratios(rows)
    print(markdown(rows))
    path = os.path.join(args.out, "results.json")
    write_results(rows, path, " ".join(["python", "bench.py", *(sys.argv[1:] if argv is None else argv)]))
    drawn = chart(rows, os.path.join(args.out, "bench.png")) if rows else False
    print(f"\nwrote {path}" + (" and bench.png" if drawn else ""))
    return rows


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"bench.py: error: {e}")
