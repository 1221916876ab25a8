"""Fine-tune GPT-2 with LoRA (or all its weights, --rank 0) on data made by prepare_data.py.

    python train.py --rank 4                        # LoRA r=4 on Wq, Wv of GPT-2 124M, tiny Shakespeare
    python train.py --rank 0                        # full fine-tuning, the baseline LoRA is measured against
    python train.py --base scratch --rank 0 ...     # pre-train a small base offline
    torchrun --nproc_per_node 4 train.py --rank 4   # data-parallel on 4 GPUs (or CPU processes)

One straight path in `train()`: data → base model → LoRA (freezes the base) → device → optimizer
over the trainable parameters → resume → compile → DDP → the loop. Output in the run folder
(--run-dir): `adapter.safetensors` (LoRA), `config.json` + `model.safetensors` (--rank 0) or
`method.safetensors` (--method), `log.jsonl`, and `train_state.pt`, the checkpoint --resume reads.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import pickle
import shutil
import sys
import time
import zipfile
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from lora import DEFAULT_TARGETS, VARIANTS, LoRAConfig, apply_lora, save_adapter
from model import GPT, GPTConfig
from prepare_data import DEFAULT_DATA, TOKENIZER, Split, check_token_ids, load_split, open_data
from utils import (
    add_hardware_flags,
    atomic_path,
    autocast,
    describe_dtype,
    parameter_summary,
    resolve_device,
    resolve_dtype,
    synchronize,
)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 with LoRA (Hu et al., 2021) or fully (--rank 0). "
        "Run under torchrun for several GPUs or processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    lora = parser.add_argument_group("LoRA (paper §4)")
    lora.add_argument("--rank", type=int, default=4, help="r, the rank of ΔW = B·A; 0: full fine-tuning instead")
    lora.add_argument("--alpha", type=float, help="α (if unset, 8): ΔW is scaled by α/r, so α need not follow r")
    targets_help = f"weights to adapt, of q,k,v,o,mlp (if unset, {','.join(DEFAULT_TARGETS)}: §4.2's best on a budget)"
    lora.add_argument("--targets", help=targets_help)
    lora.add_argument("--lora-dropout", type=float, help="dropout on the LoRA branch's input (if unset, 0)")
    variant_help = "the adapted layer: lora (eq. 3), or a variant of it (if unset, lora): dora (lab/dora.py)"
    lora.add_argument("--variant", choices=VARIANTS, help=variant_help)
    method_help = (
        "with --rank 0: a method of Table 3 instead of full fine-tuning, NAME=SIZE: ft-top=2, adapter-h=8, "
        "adapter-l=16, prefix=8 (lab/methods.py)"
    )
    lora.add_argument("--method", help=method_help)
    model = parser.add_argument_group("model and data")
    base_help = "gpt2, gpt2-medium, gpt2-large, gpt2-xl (the hub), a --rank 0 run's folder, or scratch (random)"
    model.add_argument("--base", default="gpt2", help=base_help)
    model.add_argument("--n-layer", type=int, default=6, help="with --base scratch: transformer blocks")
    model.add_argument("--n-head", type=int, default=6, help="with --base scratch: attention heads")
    model.add_argument("--n-embd", type=int, default=384, help="with --base scratch: width")
    data_help = f"a folder made by prepare_data.py ({DEFAULT_DATA} is prepared on first use)"
    model.add_argument("--data", default=DEFAULT_DATA, help=data_help)
    run_help = "the adapter (or model), log.jsonl, train_state.pt; a folder of another run is refused (see --resume)"
    model.add_argument("--run-dir", default="out", help=run_help)
    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--max-iters", type=int, default=1000, help="optimizer steps")
    loop.add_argument("--epochs", type=float, help="with --batching padded: passes over the examples, not --max-iters")
    batching_help = (
        "packed: windows of --block-size tokens (pairs: from an example's start); padded: one whole example "
        "a row, right-padded (pairs only; the paper's E2E setup)"
    )
    loop.add_argument("--batching", choices=("packed", "padded"), default="packed", help=batching_help)
    loop.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, per process")
    loop.add_argument("--block-size", type=int, default=256, help="tokens per sequence (the longest, when padded)")
    loop.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    lr_help = "peak learning rate; if unset, 1e-3, or 1e-4 when --rank 0 fine-tunes a pre-trained model"
    loop.add_argument("--lr", type=float, help=lr_help)
    schedule_help = "after the warmup: cosine decay to lr/10, or linear to 0 (the paper's E2E runs)"
    loop.add_argument("--schedule", choices=("cosine", "linear"), default="cosine", help=schedule_help)
    loop.add_argument("--warmup-iters", type=int, default=100, help="steps of linear warmup from 0 to --lr")
    loop.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, on matrices only")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this (0: off)")
    loop.add_argument("--label-smoothing", type=float, default=0.0, help="of the cross-entropy (the paper's E2E: 0.1)")
    loop.add_argument("--eval-interval", type=int, default=100, help="evaluate and write a checkpoint every N steps")
    loop.add_argument("--eval-iters", type=int, default=20, help="validation batches averaged per evaluation")
    loop.add_argument("--seed", type=int, default=1337, help="seeds the initialisation, the batches and dropout")
    resume_help = "continue the run in --run-dir from its train_state.pt (weights, optimizer, step, random states)"
    loop.add_argument("--resume", action="store_true", help=resume_help)
    overwrite_help = "replace the run in --run-dir: its files go once every input has been checked"
    loop.add_argument("--overwrite", action="store_true", help=overwrite_help)
    system = parser.add_argument_group("hardware")
    add_hardware_flags(system, "the autocast dtype (LoRA keeps its frozen base in it when it has 16 bits)")
    system.add_argument("--compile", action="store_true", help="torch.compile the model (faster on a GPU, once warm)")
    checkpointing_help = "recompute each block's activations in the backward pass: less memory, more compute"
    system.add_argument("--activation-checkpointing", action="store_true", help=checkpointing_help)
    args = parser.parse_args(argv)
    lora_flags = {
        "--alpha": args.alpha,
        "--targets": args.targets,
        "--lora-dropout": args.lora_dropout,
        "--variant": args.variant,
    }
    given = [flag for flag, value in lora_flags.items() if value is not None]
    if args.rank < 0:
        parser.error(f"--rank must be >= 0 (0: full fine-tuning), got {args.rank}")
    if args.method and args.rank != 0:
        parser.error(f"--method {args.method} replaces LoRA: give --rank 0 with it")
    if args.rank == 0 and given:
        parser.error(f"{', '.join(given)} configure LoRA, but --rank 0 trains every weight without it: drop them")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --run-dir, --overwrite replaces it: choose one")
    if args.epochs is not None and args.batching != "padded":
        parser.error("--epochs counts passes over whole examples: use it with --batching padded")
    if min(args.max_iters, args.batch_size, args.block_size, args.grad_accum, args.eval_interval, args.eval_iters) < 1:
        parser.error(
            "--max-iters, --batch-size, --block-size, --grad-accum, --eval-interval, --eval-iters must be >= 1"
        )
    if args.lr is None:
        args.lr = 1e-4 if args.rank == 0 and args.base != "scratch" else 1e-3
    return args


def parse_targets(text: str) -> tuple[str, ...]:
    """'q,v' -> ('q', 'v')."""
    return tuple(t.strip() for t in text.split(",") if t.strip())


def lora_config(args: argparse.Namespace) -> LoRAConfig | None:
    """The LoRA settings of the command line; None for full fine-tuning (--rank 0)."""
    if args.rank == 0:
        return None
    targets = parse_targets(args.targets) if args.targets is not None else DEFAULT_TARGETS
    alpha, dropout = (8.0 if args.alpha is None else args.alpha), (args.lora_dropout or 0.0)
    return LoRAConfig(args.rank, alpha, targets, dropout, args.variant or "lora")


# ---- batches from a data folder (read by prepare_data.load_split) ----------------------------------


def packed_batch(
    split: Split, batch_size: int, block_size: int, generator: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: (batch_size, block_size) int64 windows at random places; y is x shifted by one, -1 where
    no loss is taken (pairs' contexts)."""
    n_starts = len(split.starts) if split.starts is not None else len(split.tokens) - block_size
    ix = torch.randint(n_starts, (batch_size,), generator=generator).numpy()
    if split.starts is not None:
        ix = split.starts[ix]
    x = torch.from_numpy(np.stack([split.tokens[i : i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([split.tokens[i + 1 : i + 1 + block_size] for i in ix]).astype(np.int64))
    if split.mask is not None:
        y[torch.from_numpy(np.stack([split.mask[i + 1 : i + 1 + block_size] for i in ix])) == 0] = -1
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def padded_batch(split: Split, indices: list[int], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: one whole example per row, right-padded to the longest (B, T); y is -1 on the context
    and the padding, so the loss is on the targets alone."""
    rows = [split.examples[i] for i in indices]
    T = max(end - start for start, end in rows) - 1
    x, y = torch.zeros(len(rows), T, dtype=torch.long), torch.full((len(rows), T), -1, dtype=torch.long)
    for row, (start, end) in enumerate(rows):
        tokens = torch.from_numpy(split.tokens[start:end].astype(np.int64))
        is_target = torch.from_numpy(split.mask[start + 1 : end].astype(bool))
        x[row, : end - start - 1] = tokens[:-1]
        y[row, : end - start - 1] = tokens[1:].masked_fill(~is_target, -1)
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def epoch_order(n_examples: int, first: int, count: int, seed: int) -> list[int]:
    """Examples `first` .. `first + count - 1` of the run's sequence of epochs, each epoch a new
    shuffle: a function of the position alone, so a resumed run draws what the straight one would."""
    shuffles: dict[int, torch.Tensor] = {}  # one permutation per epoch the positions fall in (one or two)
    order = []
    for position in range(first, first + count):
        epoch, i = divmod(position, n_examples)
        if epoch not in shuffles:
            shuffles[epoch] = torch.randperm(n_examples, generator=torch.Generator().manual_seed(seed + epoch))
        order.append(int(shuffles[epoch][i]))
    return order


def training_batches(
    split: Split,
    args: argparse.Namespace,
    step: int,
    process: int,
    world_size: int,
    generator: torch.Generator,
    device: str,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The --grad-accum micro-batches of one optimizer step for one process."""
    if args.batching == "packed":
        return [
            packed_batch(split, args.batch_size, args.block_size, generator, device) for _ in range(args.grad_accum)
        ]
    batches = []
    for micro in range(args.grad_accum):
        first = ((step * args.grad_accum + micro) * world_size + process) * args.batch_size
        batches.append(padded_batch(split, epoch_order(len(split.examples), first, args.batch_size, args.seed), device))
    return batches


def validation_batches(split: Split, args: argparse.Namespace, device: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same --eval-iters batches at every evaluation, so the numbers compare across the run:
    seeded windows (packed), or the first examples in order (padded)."""
    if args.batching == "packed":
        generator = torch.Generator().manual_seed(args.seed)
        return [
            packed_batch(split, args.batch_size, args.block_size, generator, device) for _ in range(args.eval_iters)
        ]
    n = min(len(split.examples), args.eval_iters * args.batch_size)
    return [
        padded_batch(split, list(range(i, min(i + args.batch_size, n))), device) for i in range(0, n, args.batch_size)
    ]


# ---- the loss: summed over target tokens, divided by their count over the whole step -------------


def forward_backward(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    precision,
    scaler: torch.amp.GradScaler,
    label_smoothing: float = 0.0,
) -> float:
    """Accumulate one optimizer step's gradient over `batches` (micro-batches). The loss is the sum
    of cross-entropies over every target token of every micro-batch (and every process), divided
    by their total count: the mean over target tokens of the whole step, as if it were one batch,
    however unevenly the targets (masked pairs) fall. Returns that mean for this process's tokens."""
    n_local = sum(int((y != -1).sum()) for _, y in batches)
    n_step = torch.tensor(n_local, dtype=torch.float32, device=batches[0][0].device)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if world_size > 1:
        dist.all_reduce(n_step)  # DDP averages gradients over processes; × world_size below undoes that
    if n_step == 0:
        raise ValueError("a training step drew no target token: a loss over nothing is not 0")
    loss_sum = torch.zeros((), device=n_step.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()  # all-reduce once per step
        with sync:
            with precision:
                _, mean = model(x, y, label_smoothing=label_smoothing)
            summed = mean * (y != -1).sum()
            scaler.scale(summed * world_size / n_step).backward()
        loss_sum += summed.detach()  # no .item() here: on a GPU it would wait for each micro-batch
    return loss_sum.item() / max(n_local, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision) -> float:
    """Mean loss over the target tokens of the validation batches (no label smoothing)."""
    model.eval()
    loss_sum, n_targets = 0.0, 0
    for x, y in batches:
        with precision:
            _, mean = model(x, y)
        n = int((y != -1).sum())
        loss_sum, n_targets = loss_sum + mean.item() * n, n_targets + n
    model.train()
    return loss_sum / n_targets


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to --lr, then cosine decay to lr/10 or linear decay to 0 at --max-iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = min(1.0, (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters))
    if args.schedule == "linear":
        return args.lr * (1 - progress)
    return args.lr / 10 + 0.5 * (args.lr - args.lr / 10) * (1 + math.cos(math.pi * progress))


# ---- the run folder and its checkpoints ---------------------------------------------------------
#
# A checkpoint is train_state.pt alone: the trained weights (the LoRA tensors, or every weight for
# --rank 0), the optimizer, the step and the random states, written atomically as one file, so
# --resume never pairs weights of one step with an optimizer of another. The adapter (or model)
# beside it is the run's product, written after it; a crash in between leaves the product one
# checkpoint behind, never half written.

RUN_FILES = (
    "adapter.safetensors",
    "method.safetensors",
    "config.json",
    "model.safetensors",
    "train_state.pt",
    "log.jsonl",
)


def check_run_folder(run: str, resume: bool, overwrite: bool) -> list[str]:
    """The rule for --run-dir: a new run needs a folder without another run's files, unless --overwrite
    (those files are then returned, to delete once every input is checked); --resume needs one."""
    if resume:
        if not os.path.isfile(os.path.join(run, "train_state.pt")):
            raise FileNotFoundError(f"nothing to resume: no {os.path.join(run, 'train_state.pt')}")
        return []
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(run, name))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{run} holds another run ({', '.join(existing)}): --resume continues it, --overwrite replaces it, "
            "or choose another --run-dir"
        )
    return existing


def run_settings(args: argparse.Namespace) -> dict:
    """What must not change between a run and its --resume."""
    config = lora_config(args)
    scratch = [args.n_layer, args.n_head, args.n_embd, args.block_size] if args.base == "scratch" else None
    return {
        "base": args.base,
        "scratch_shape": scratch,
        "lora": asdict(config) if config else None,
        "method": args.method,
        "batching": args.batching,
    }


def rng_state(generator: torch.Generator, device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def save_checkpoint(
    args: argparse.Namespace,
    raw_model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    step: int,
    rng_states: list[dict],
) -> None:
    """train_state.pt (the checkpoint, one atomic file), then the adapter or model (the product)."""
    trained = {name: p.detach() for name, p in raw_model.named_parameters() if p.requires_grad}
    state = {
        "step": step,
        "trained": trained,
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng_states,
        "settings": run_settings(args),
    }
    with atomic_path(os.path.join(args.run_dir, "train_state.pt")) as tmp:
        torch.save(state, tmp)
    name, save = product(args)
    save(raw_model, os.path.join(args.run_dir, name))


def product(args: argparse.Namespace) -> tuple[str, Callable[[GPT, str], None]]:
    """The file a run writes beside its checkpoint, and how: the adapter (LoRA), a lab method's parameters
    (--method), or the whole model (--rank 0, with its config.json)."""
    if args.method:
        return "method.safetensors", importlib.import_module("lab.methods").save_method
    if args.rank > 0:
        return "adapter.safetensors", save_adapter

    def save_model(model: GPT, path: str) -> None:
        model.save_pretrained(os.path.dirname(path))
        if os.path.isfile(os.path.join(args.data, TOKENIZER)):  # a trimmed BPE (lab.miniature): the model reads it
            shutil.copy(os.path.join(args.data, TOKENIZER), os.path.dirname(path))

    return "model.safetensors", save_model


def read_train_state(path: str, settings: dict, world_size: int) -> dict:
    """train_state.pt, refusing anything that is not a whole state written by this script for these settings."""
    if not zipfile.is_zipfile(path):  # an empty or cut-short file, before torch.load misreads it
        what = "empty" if os.path.getsize(path) == 0 else "truncated or corrupt"
        raise ValueError(f"{path} is {what}: not the whole zip archive that train.py's torch.save writes")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path} holds Python objects, not only tensors: it is not a state written by train.py, and it is refused"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    keys = ("step", "trained", "optimizer", "scaler", "rng", "settings")
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise ValueError(f"{path} is not a state written by train.py (it lacks {', '.join(keys)})")
    stored = {"method": None} | state["settings"] if isinstance(state["settings"], dict) else state["settings"]
    # its LoRA settings read as a LoRAConfig: an older run, without a field added since, resumes with its default
    if isinstance(stored, dict) and stored.get("lora") is not None:
        stored = stored | {"lora": asdict(LoRAConfig.from_dict(stored["lora"], path))}
    if stored != settings:
        raise ValueError(
            f"{path} was written by a run with {stored}; resume it with the same --base, LoRA settings, --method and --batching"
        )
    if len(state["rng"]) != world_size:
        raise ValueError(f"{path} was written by {len(state['rng'])} processes; resume with as many")
    return state


def restore(
    state: dict,
    raw_model: GPT,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    generator: torch.Generator,
    process: int,
    device: str,
) -> int:
    """Put the trained weights, optimizer and this process's random states back; returns the step."""
    trainable = {name: p for name, p in raw_model.named_parameters() if p.requires_grad}
    if state["trained"].keys() != trainable.keys():
        raise ValueError("train_state.pt holds other trained weights than this model's")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trained"][name])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng = state["rng"][process]
    torch.set_rng_state(rng["torch"])
    generator.set_state(rng["batches"])
    if "cuda" in rng and device.startswith("cuda"):
        torch.cuda.set_rng_state(rng["cuda"], device)
    return state["step"]


# ---- setup ---------------------------------------------------------------------------------------


def setup_processes(device: str) -> tuple[str, int, int]:
    """(device, process rank, world size). torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; each process
    drives one device."""
    if "RANK" not in os.environ:
        return device, 0, 1
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    return device, dist.get_rank(), dist.get_world_size()


def build_model(
    base: str, scratch_sizes: dict[str, int], block_size: int, data: str, vocab_size: int, config: LoRAConfig | None
) -> GPT:
    """The base (pre-trained, a --rank 0 folder, or random with `scratch_sizes`), then LoRA on it
    (which freezes the base). It must cover the vocabulary of the data folder `data` and `block_size`."""
    if base == "scratch":
        model = GPT(GPTConfig(block_size=block_size, vocab_size=vocab_size, **scratch_sizes))
    else:
        model = GPT.from_pretrained(base)
    if model.config.vocab_size < vocab_size or model.config.block_size < block_size:
        raise ValueError(
            f"{data} needs vocab {vocab_size} and --block-size {block_size}; the model has "
            f"vocab {model.config.vocab_size} and block size {model.config.block_size}"
        )
    return apply_lora(model, config) if config else model


def freeze_base_in(model: GPT, dtype: torch.dtype) -> None:
    """LoRA's frozen base in `dtype` (16 bits, under autocast in it), A and B in fp32: §4.2's 350 GB is GPT-3's
    175B frozen weights in 16 bits. Half the memory, and no fp32 weight for autocast to cast every step.
    With float32 nothing changes."""
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def make_optimizer(model: GPT, lr: float, weight_decay: float, device: str) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; weight decay on matrices, not biases or LayerNorms."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    # fused: one kernel for every tensor (the miniature's 16M parameters on 2 cores of a Xeon: 9 ms a step, 39 unfused)
    fused = device.split(":")[0] in ("cuda", "cpu")
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, fused=fused)


def start_log(path: str, replaced: list[str], resume_step: int | None) -> None:
    """The run folder is written from here on: --overwrite's old run goes whole, before this one
    writes anything; on --resume the log keeps its records up to the checkpoint (a crash may have
    logged more)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    for name in replaced:
        os.remove(os.path.join(folder, name))
    keep = []
    if resume_step is not None and os.path.exists(path):
        with open(path) as f:
            keep = [line for line in f if line.strip() and json.loads(line)["step"] <= resume_step]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines(keep)


def log(path: str, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ---- training ------------------------------------------------------------------------------------


def load_data(folder: str, block_size: int, padded: bool, world_size: int, is_main: bool) -> tuple[dict, Split, Split]:
    """meta.json and the two splits; the main process prepares the default folder first if it must."""
    if world_size > 1 and not is_main:
        dist.barrier()  # wait while the main process prepares the default data, if it must
    meta = open_data(folder)
    if world_size > 1 and is_main:
        dist.barrier()
    return meta, *(load_split(folder, s, block_size, meta["eot_token"], padded) for s in ("train", "val"))


def optimizer_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    precision,
    args: argparse.Namespace,
) -> float:
    """Gradients of one step's micro-batches, clipped, then one AdamW step; returns the loss."""
    loss = forward_backward(model, batches, precision, scaler, args.label_smoothing)
    if args.grad_clip > 0:
        scaler.unscale_(optimizer)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss


def all_rng_states(generator: torch.Generator, device: str, world_size: int) -> list[dict]:
    """Every process's random states, gathered for the checkpoint."""
    if world_size == 1:
        return [rng_state(generator, device)]
    states = [None] * world_size
    dist.all_gather_object(states, rng_state(generator, device))
    return states


def train(args: argparse.Namespace) -> GPT:
    replaced = check_run_folder(args.run_dir, args.resume, args.overwrite)  # bad input fails before any file is touched
    config = lora_config(args)
    device, process, world_size = setup_processes(resolve_device(args.device))
    is_main = process == 0  # only the main process prints and writes files
    dtype = resolve_dtype(device, args.dtype)
    precision = autocast(device, dtype)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (Ampere and newer)
    meta, train_split, val_split = load_data(args.data, args.block_size, args.batching == "padded", world_size, is_main)
    if args.epochs is not None:  # --max-iters becomes the steps that many passes over the examples take
        examples_per_step = args.batch_size * args.grad_accum * world_size
        args.max_iters = max(1, math.ceil(args.epochs * len(train_split.examples) / examples_per_step))

    # -- model: base, LoRA (freezes the base), device, optimizer
    torch.manual_seed(args.seed)
    scratch_sizes = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    raw_model = build_model(args.base, scratch_sizes, args.block_size, args.data, meta["vocab_size"], config)
    if args.method:  # a method LoRA is compared with (lab/methods.py): it freezes the base and adds its own parameters
        raw_model = importlib.import_module("lab.methods").apply_method(raw_model, args.method)
    raw_model.to(device)
    raw_model.activation_checkpointing = args.activation_checkpointing
    if config:
        freeze_base_in(raw_model, dtype)  # the paper's setup: W0 in the autocast dtype, A and B (and AdamW's) in fp32
    for split, name in ((train_split, "train"), (val_split, "val")):
        check_token_ids(split, os.path.join(args.data, f"{name}.bin"), raw_model.config.vocab_size)
    if is_main:
        what = f"LoRA r={config.rank} on {','.join(config.targets)}" if config else args.method or "full fine-tuning"
        print(f"{args.base} + {what}: {parameter_summary(raw_model)}")
        base_in = f", frozen base in {str(dtype).removeprefix('torch.')}" if config and dtype != torch.float32 else ""
        print(f"precision: autocast {describe_dtype(device, args.dtype)}{base_in}")
    optimizer = make_optimizer(raw_model, args.lr, args.weight_decay, device)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)  # fp16 needs loss scaling

    # -- state to resume from, then compile and DDP (after freezing: DDP registers what needs gradients)
    batch_generator = torch.Generator().manual_seed(args.seed + process)  # each process its own batches
    torch.manual_seed(args.seed + process)  # dropout masks differ across processes too
    start_step = 0
    if args.resume:
        state = read_train_state(os.path.join(args.run_dir, "train_state.pt"), run_settings(args), world_size)
        start_step = restore(state, raw_model, optimizer, scaler, batch_generator, process, device)
    compiled = torch.compile(raw_model) if args.compile else raw_model
    model = DDP(compiled, device_ids=[device] if device.startswith("cuda") else None) if world_size > 1 else compiled

    # -- the loop
    log_path, val_batches = os.path.join(args.run_dir, "log.jsonl"), validation_batches(val_split, args, device)
    if is_main:
        start_log(log_path, replaced, start_step if args.resume else None)
        if start_step == 0:
            log(log_path, {"step": 0, "val_loss": evaluate(compiled, val_batches, precision)})
    model.train()
    started, seconds, n_tokens, saved_step = time.time(), 0.0, 0, start_step if args.resume else None
    bar = tqdm(
        range(start_step, args.max_iters), "training", initial=start_step, total=args.max_iters, disable=not is_main
    )
    step = start_step
    try:
        for step in bar:
            step_started, lr = time.time(), learning_rate(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = training_batches(train_split, args, step, process, world_size, batch_generator, device)
            train_loss = optimizer_step(model, optimizer, scaler, batches, precision, args)
            synchronize(device)  # for an honest tokens/s
            seconds += time.time() - step_started
            n_tokens += sum(x.numel() for x, _ in batches) * world_size
            tokens_per_s = n_tokens / seconds  # mean over this run, padding included
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")
            if (step + 1) % args.eval_interval == 0 or step + 1 == args.max_iters:
                rng_states = all_rng_states(batch_generator, device, world_size)
                if is_main:
                    val_loss = evaluate(compiled, val_batches, precision)  # the main process's alone
                    bar.write(f"step {step + 1}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                    record = dict(step=step + 1, train_loss=train_loss, val_loss=val_loss, lr=lr)
                    speed = dict(tokens_per_s=round(tokens_per_s), elapsed_s=round(time.time() - started, 1))
                    log(log_path, record | speed)
                    save_checkpoint(args, raw_model, optimizer, scaler, step + 1, rng_states)
                    saved_step = step + 1
    except KeyboardInterrupt:
        bar.close()
        where = f"the last checkpoint is step {saved_step} in {args.run_dir}: --resume continues from it"
        print(f"train.py: interrupted at step {step}; {where if saved_step else 'no checkpoint yet'}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()
    if is_main and start_step < args.max_iters:
        written = os.path.join(args.run_dir, product(args)[0])
        print(
            f"{args.max_iters - start_step} steps in {time.time() - started:.0f} s, {tokens_per_s:,.0f} tokens/s "
            f"while training; wrote {written} ({os.path.getsize(written) / 1e6:.2f} MB)"
        )
    if world_size > 1:
        dist.destroy_process_group()
    return raw_model


def main(argv: list[str] | None = None) -> GPT:
    """Command line entry; returns the trained model (the raw one, no compile or DDP wrapper)."""
    args = parse_args(argv)
    try:
        return train(args)
    except (ValueError, OSError) as e:
        sys.exit(f"train.py: error: {e}")


if __name__ == "__main__":
    main()
