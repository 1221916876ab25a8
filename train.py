"""Fine-tune GPT-2 with LoRA (or all its weights, --rank 0) on data made by prepare_data.py.

    python train.py --rank 4                          # LoRA r=4 on Wq, Wv of GPT-2 124M, tiny Shakespeare
    python train.py --rank 0                          # full fine-tuning, the baseline LoRA is measured against
    python train.py --init-from scratch --rank 0 ...  # pre-train a small base offline
    torchrun --nproc_per_node 4 train.py --rank 4     # data-parallel on 4 GPUs (or CPU processes)

One straight path, top to bottom in `train()`: data → base model → LoRA (freezes the base) →
device → optimizer over the trainable parameters → compile → DDP → the loop. Output in --out:
`adapter.safetensors` (LoRA) or `config.json` + `model.safetensors` (--rank 0), `log.jsonl`, and
`train_state.pt` (optimizer, step, RNG states) for --resume.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
import pickle
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import prepare_data
from lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, parameter_summary, parse_targets, save_adapter
from model import GPT, GPTConfig, atomic_path, autocast, resolve_device, resolve_dtype

DEFAULT_DATA = os.path.join("data", "shakespeare")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Fine-tune GPT-2 with LoRA (Hu et al., 2021) or fully (--rank 0). "
        "Run under torchrun for several GPUs or processes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    lora = parser.add_argument_group("LoRA (paper §4)")
    lora.add_argument("--rank", type=int, default=4,
                      help="r, the rank of ΔW = B·A; 0 trains every weight instead (full fine-tuning)")
    lora.add_argument("--alpha", type=float, default=None,
                      help="α (default 8): the update is scaled by α/r, so α need not change with r")
    lora.add_argument("--targets", default=None,
                      help=f"weights to adapt, from q,k,v,o,mlp (default {','.join(DEFAULT_TARGETS)}; §4.2: q,v does "
                      "best on a budget)")  # fmt: skip
    lora.add_argument("--lora-dropout", type=float, default=None,
                      help="dropout on the LoRA branch's input (default 0)")
    model = parser.add_argument_group("model and data")
    model.add_argument("--init-from", default="gpt2",
                       help="gpt2, gpt2-medium, gpt2-large, gpt2-xl (Hugging Face hub), a folder written by a --rank 0 "
                       "run, or scratch (a random model shaped by --n-layer/--n-head/--n-embd)")  # fmt: skip
    model.add_argument("--n-layer", type=int, default=6, help="with --init-from scratch: transformer blocks")
    model.add_argument("--n-head", type=int, default=6, help="with --init-from scratch: attention heads")
    model.add_argument("--n-embd", type=int, default=384, help="with --init-from scratch: width")
    model.add_argument("--data", default=DEFAULT_DATA,
                       help=f"a folder made by prepare_data.py ({DEFAULT_DATA} is prepared on first use)")
    model.add_argument("--out", default="out",
                       help="the run's folder: the adapter (or model), log.jsonl and train_state.pt. A folder that "
                       "holds another run is refused unless --resume continues it or --overwrite replaces it")
    loop = parser.add_argument_group("optimisation")
    loop.add_argument("--max-iters", type=int, default=1000, help="optimizer steps")
    loop.add_argument("--batch-size", type=int, default=8, help="sequences per micro-batch, per process")
    loop.add_argument("--block-size", type=int, default=256, help="tokens per sequence")
    loop.add_argument("--grad-accum", type=int, default=4, help="micro-batches per optimizer step")
    loop.add_argument("--lr", type=float, default=None,
                      help="peak learning rate; if unset, 1e-3, or 1e-4 when --rank 0 fine-tunes every weight of a "
                      "pre-trained model")  # fmt: skip
    loop.add_argument("--warmup-iters", type=int, default=100,
                      help="linear warmup, then cosine decay to lr/10 at --max-iters")
    loop.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay, on matrices only")
    loop.add_argument("--grad-clip", type=float, default=1.0, help="clip the gradient's global norm to this (0: off)")
    loop.add_argument("--eval-interval", type=int, default=100,
                      help="evaluate and write a checkpoint every this many steps")
    loop.add_argument("--eval-iters", type=int, default=20, help="validation batches averaged per evaluation")
    loop.add_argument("--seed", type=int, default=1337, help="seeds the initialisation, the batches and dropout")
    loop.add_argument("--resume", action="store_true",
                      help="continue the run in --out from its last checkpoint (train_state.pt: the trained weights, "
                      "optimizer, step and random states)")
    loop.add_argument("--overwrite", action="store_true",
                      help="replace the run in --out: its files are deleted once every input has been checked")
    system = parser.add_argument_group("hardware")
    system.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")
    system.add_argument("--dtype", default="auto",
                        help="autocast dtype: auto (bfloat16 where CUDA supports it, else float16 with a GradScaler; "
                        "float32 on CPU), float32, bfloat16, float16")  # fmt: skip
    system.add_argument("--compile", action="store_true",
                        help="torch.compile the model (faster on GPU after a warm-up)")
    args = parser.parse_args(argv)
    given = [flag for flag, value in (("--alpha", args.alpha), ("--targets", args.targets),
                                      ("--lora-dropout", args.lora_dropout)) if value is not None]  # fmt: skip
    if args.rank == 0 and given:
        parser.error(f"{', '.join(given)} configure LoRA, but --rank 0 trains every weight without it: drop them")
    if args.resume and args.overwrite:
        parser.error("--resume continues the run in --out, --overwrite replaces it: choose one")
    args.alpha = 8.0 if args.alpha is None else args.alpha
    args.targets = ",".join(DEFAULT_TARGETS) if args.targets is None else args.targets
    args.lora_dropout = 0.0 if args.lora_dropout is None else args.lora_dropout
    if args.lr is None:
        args.lr = 1e-4 if args.rank == 0 and args.init_from != "scratch" else 1e-3
    return args


# ---- data: token files from prepare_data.py, read through np.memmap --------------------------------


@dataclass
class Split:
    tokens: np.ndarray  # uint16 token ids
    mask: np.ndarray | None  # uint8, 1 where a token is a target (pairs), None for plain text
    starts: np.ndarray | None  # where a window may start: each example's first token (pairs), None: anywhere


def load_split(folder: str, split: str, block_size: int, eot_token: int) -> Split:
    """A split's tokens (and loss mask), checked: a file of the wrong size, or pairs whose windows
    would hold no target token (a loss over nothing), are errors naming the file."""
    path = os.path.join(folder, f"{split}.bin")
    if os.path.getsize(path) % 2:
        raise ValueError(f"{path} has an odd number of bytes: not uint16 token ids written by prepare_data.py")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    if len(tokens) <= block_size:
        raise ValueError(f"{path} has {len(tokens)} tokens, too few for --block-size {block_size}")
    mask_path = os.path.join(folder, f"{split}_mask.bin")
    if not os.path.exists(mask_path):
        return Split(tokens, None, None)
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r")
    if len(mask) != len(tokens):
        raise ValueError(f"{mask_path} has {len(mask)} entries for the {len(tokens)} tokens of {path}")
    # every example ends with <|endoftext|>: windows start on an example's first token, so a target
    # is never seen without its context; a window runs on into the next examples (packing)
    starts = np.concatenate([[0], np.flatnonzero(np.asarray(tokens) == eot_token)[:-1] + 1])
    targets = np.flatnonzero(np.asarray(mask))
    if len(targets) == 0:
        raise ValueError(f"{mask_path} marks no target token")
    # y covers tokens start+1 .. start+block_size: keep the windows whose example's target begins there
    first_target = targets[np.minimum(np.searchsorted(targets, starts), len(targets) - 1)]
    reaches = (first_target > starts) & (first_target - starts <= block_size) & (starts + block_size < len(tokens))
    if not reaches.any():
        raise ValueError(
            f"no window of --block-size {block_size} in {path} reaches a target token: the shortest context is "
            f"{int((first_target - starts).min())} tokens; use --block-size {int(np.diff(starts).max())} or more "
            "to see whole examples"
        )
    return Split(tokens, mask, starts[reaches])


def get_batch(
    split: Split, batch_size: int, block_size: int, generator: torch.Generator, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, y: (batch_size, block_size) int64; y is x shifted by one, -1 where no loss is taken."""
    n_starts = len(split.starts) if split.starts is not None else len(split.tokens) - block_size
    ix = torch.randint(n_starts, (batch_size,), generator=generator).numpy()
    if split.starts is not None:
        ix = split.starts[ix]
    x = torch.from_numpy(np.stack([split.tokens[i : i + block_size] for i in ix]).astype(np.int64))
    y = torch.from_numpy(np.stack([split.tokens[i + 1 : i + 1 + block_size] for i in ix]).astype(np.int64))
    if split.mask is not None:
        y[torch.from_numpy(np.stack([split.mask[i + 1 : i + 1 + block_size] for i in ix])) == 0] = -1
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def open_data(folder: str) -> dict:
    """meta.json of a prepare_data.py folder; the default Shakespeare folder is prepared if missing."""
    if folder == DEFAULT_DATA and not os.path.exists(folder):
        print(f"{folder} is missing: preparing tiny Shakespeare")
        prepare_data.prepare(None, "shakespeare", out_dir=os.path.dirname(folder))
    for name in ("meta.json", "train.bin", "val.bin"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(
                f"{folder} is not a data folder (no {name}): make one with prepare_data.py --input FILE"
            )
    path = os.path.join(folder, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not JSON ({e}): remake the folder with prepare_data.py") from None
    missing = [key for key in ("vocab_size", "eot_token") if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise ValueError(f"{path} has no '{missing[0]}': remake the folder with prepare_data.py")
    return meta


def check_token_ids(split: Split, folder: str, name: str, vocab_size: int) -> None:
    """Token ids must index the model's embedding; found here, not as an index error at step 0."""
    largest = int(split.tokens.max())
    if largest >= vocab_size:
        raise ValueError(f"{folder}/{name}.bin holds token id {largest}, beyond the model's vocabulary of {vocab_size}")


# ---- the loss: summed over target tokens, divided by their count over the whole step -------------


def summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ of the cross-entropies over the target tokens (targets != -1), in fp32."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-1, reduction="sum")


def forward_backward(
    model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], precision, scaler: torch.amp.GradScaler
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
    loss_sum = torch.zeros((), device=n_step.device)
    for i, (x, y) in enumerate(batches):
        last = i == len(batches) - 1
        sync = model.no_sync() if isinstance(model, DDP) and not last else nullcontext()  # all-reduce once per step
        with sync:
            with precision:
                logits, _ = model(x)
            summed = summed_loss(logits, y)
            scaler.scale(summed * world_size / n_step.clamp(min=1)).backward()
        loss_sum += summed.detach()  # no .item() here: on a GPU it would wait for each micro-batch
    return loss_sum.item() / max(n_local, 1)


@torch.no_grad()
def evaluate(model: torch.nn.Module, split: Split, args: argparse.Namespace, precision, device: str) -> float:
    """Mean loss over the target tokens of --eval-iters validation batches: the same batches at
    every evaluation (their own seeded generator), so the numbers compare across the run."""
    model.eval()
    generator = torch.Generator().manual_seed(args.seed)
    loss_sum, n_targets = 0.0, 0
    for _ in range(args.eval_iters):
        x, y = get_batch(split, args.batch_size, args.block_size, generator, device)
        with precision:
            logits, _ = model(x)
        loss_sum += summed_loss(logits, y).item()
        n_targets += int((y != -1).sum())
    model.train()
    if n_targets == 0:
        raise ValueError("the validation batches hold no target token: a loss over nothing is not 0")
    return loss_sum / n_targets


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warmup to --lr, then cosine decay to lr/10 at --max-iters."""
    if step < args.warmup_iters:
        return args.lr * (step + 1) / args.warmup_iters
    progress = (step - args.warmup_iters) / max(1, args.max_iters - args.warmup_iters)
    return args.lr / 10 + 0.5 * (args.lr - args.lr / 10) * (1 + math.cos(math.pi * min(progress, 1.0)))


# ---- the run folder and its checkpoints ---------------------------------------------------------
#
# A checkpoint is train_state.pt alone: the trained weights (the LoRA tensors, or every weight for
# --rank 0), the optimizer, the step and the random states, written atomically as one file, so
# --resume never pairs weights of one step with an optimizer of another. The adapter (or model)
# beside it is the run's product, written after it; a crash in between leaves the product one
# checkpoint behind, never half written.

RUN_FILES = ("adapter.safetensors", "config.json", "model.safetensors", "train_state.pt", "log.jsonl")


def check_out_folder(out: str, resume: bool, overwrite: bool) -> list[str]:
    """The rule for --out: a new run needs a folder without another run's files, unless --overwrite
    (those files are then returned, to delete once every input is checked); --resume needs one."""
    state_path = os.path.join(out, "train_state.pt")
    if resume:
        if not os.path.isfile(state_path):
            raise FileNotFoundError(f"nothing to resume: no {state_path}")
        return []
    existing = [name for name in RUN_FILES if os.path.exists(os.path.join(out, name))]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} holds another run ({', '.join(existing)}): --resume continues it, --overwrite replaces it, "
            "or choose another --out"
        )
    return existing


def rng_state(generator: torch.Generator, device: str) -> dict:
    state = {"torch": torch.get_rng_state(), "batches": generator.get_state()}
    if device.startswith("cuda"):
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def run_settings(args: argparse.Namespace) -> dict:
    """What must not change between a run and its --resume."""
    lora = asdict(LoRAConfig(args.rank, args.alpha, parse_targets(args.targets), args.lora_dropout)) if args.rank else None
    scratch = [args.n_layer, args.n_head, args.n_embd, args.block_size] if args.init_from == "scratch" else None
    return dict(init_from=args.init_from, scratch_shape=scratch, lora=lora)


def save_checkpoint(
    args: argparse.Namespace, raw_model: GPT, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
    step: int, rng_states: list[dict],
) -> None:  # fmt: skip
    """train_state.pt (the checkpoint, one atomic file), then the adapter or model (the product)."""
    trained = {name: p.detach() for name, p in raw_model.named_parameters() if p.requires_grad}
    state = dict(step=step, trained=trained, optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 rng=rng_states, settings=run_settings(args))  # fmt: skip
    with atomic_path(os.path.join(args.out, "train_state.pt")) as tmp:
        torch.save(state, tmp)
    if args.rank > 0:
        save_adapter(raw_model, os.path.join(args.out, "adapter.safetensors"))
    else:
        raw_model.save_pretrained(args.out)


def read_train_state(path: str, args: argparse.Namespace) -> dict:
    """train_state.pt, refusing anything that is not a whole state written by this script for these settings."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ValueError(f"{path} holds Python objects, not only tensors: it is not a state written by train.py, "
                         "and it is refused") from None  # fmt: skip
    except (RuntimeError, EOFError, OSError) as e:
        raise ValueError(f"{path} is truncated or corrupt ({str(e).splitlines()[0]})") from None
    keys = ("step", "trained", "optimizer", "scaler", "rng", "settings")
    if not isinstance(state, dict) or any(key not in state for key in keys):
        raise ValueError(f"{path} is not a state written by train.py (it lacks {', '.join(keys)})")
    if state["settings"] != run_settings(args):
        raise ValueError(f"{path} was written by a run with {state['settings']}; resume it with the same "
                         "--init-from, --rank, --alpha, --targets and --lora-dropout")  # fmt: skip
    return state


def build_model(args: argparse.Namespace, meta: dict) -> GPT:
    """The base (pre-trained, a --rank 0 folder, or random), then LoRA on it (which freezes the base)."""
    if args.init_from == "scratch":
        model = GPT(GPTConfig(block_size=args.block_size, vocab_size=meta["vocab_size"],
                              n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))  # fmt: skip
    else:
        model = GPT.from_pretrained(args.init_from)
    if model.config.vocab_size < meta["vocab_size"] or model.config.block_size < args.block_size:
        raise ValueError(
            f"{args.data} needs vocab {meta['vocab_size']} and --block-size {args.block_size}; the model has "
            f"vocab {model.config.vocab_size} and block size {model.config.block_size}"
        )
    if args.rank > 0:
        apply_lora(model, args.rank, args.alpha, parse_targets(args.targets), args.lora_dropout)  # freezes the base
    return model


def train(args: argparse.Namespace) -> GPT:
    # -- checks that need nothing loaded, so bad input fails before any file is touched
    if args.rank < 0:
        raise ValueError(f"--rank must be >= 0 (0: full fine-tuning), got {args.rank}")
    if args.rank > 0:
        LoRAConfig(args.rank, args.alpha, parse_targets(args.targets), args.lora_dropout)  # validates targets, α
    if min(args.max_iters, args.batch_size, args.block_size, args.grad_accum, args.eval_interval, args.eval_iters) < 1:
        raise ValueError("--max-iters, --batch-size, --block-size, --grad-accum, --eval-interval, --eval-iters "
                         "must be >= 1")
    replaced = check_out_folder(args.out, args.resume, args.overwrite)

    # -- processes: torchrun sets RANK/LOCAL_RANK/WORLD_SIZE; each process drives one device
    device = resolve_device(args.device)
    distributed = "RANK" in os.environ
    if distributed:
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        if device.startswith("cuda"):
            device = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(device)
    process_rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    is_main = process_rank == 0  # only the main process prints and writes files
    dtype = resolve_dtype(device, args.dtype)
    precision = autocast(device, dtype)
    if device.startswith("cuda"):
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls (Ampere and newer)

    # -- data
    if distributed and not is_main:
        dist.barrier()  # wait while the main process prepares the default data, if it must
    meta = open_data(args.data)
    if distributed and is_main:
        dist.barrier()
    train_split = load_split(args.data, "train", args.block_size, meta["eot_token"])
    val_split = load_split(args.data, "val", args.block_size, meta["eot_token"])

    # -- model: base, LoRA (freezes the base), device
    torch.manual_seed(args.seed)
    raw_model = build_model(args, meta).to(device)
    for split, name in ((train_split, "train"), (val_split, "val")):
        check_token_ids(split, args.data, name, raw_model.config.vocab_size)
    if is_main:
        print(f"{args.init_from} + {f'LoRA r={args.rank} on {args.targets}' if args.rank else 'full fine-tuning'}: "
              f"{parameter_summary(raw_model)}")  # fmt: skip

    # -- optimizer over the trainable parameters; weight decay on matrices, not biases or LayerNorms
    trainable = [p for p in raw_model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=args.lr, fused=device.startswith("cuda"))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=dtype == torch.float16)  # fp16 needs loss scaling

    # -- state to resume from: optimizer, step, and each process's random generators
    batch_generator = torch.Generator().manual_seed(args.seed + process_rank)  # each process its own batches
    torch.manual_seed(args.seed + process_rank)  # dropout masks differ across processes too
    start_step = 0
    if args.resume:
        state_path = os.path.join(args.out, "train_state.pt")
        state = read_train_state(state_path, args)
        if len(state["rng"]) != world_size:
            raise ValueError(f"{state_path} was written by {len(state['rng'])} processes; resume with as many")
        trainable_by_name = {name: p for name, p in raw_model.named_parameters() if p.requires_grad}
        if state["trained"].keys() != trainable_by_name.keys():
            raise ValueError(f"{state_path} holds other trained weights than this model's")
        with torch.no_grad():
            for name, p in trainable_by_name.items():
                p.copy_(state["trained"][name])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        start_step = state["step"]
        rng = state["rng"][process_rank]
        torch.set_rng_state(rng["torch"])
        batch_generator.set_state(rng["batches"])
        if "cuda" in rng and device.startswith("cuda"):
            torch.cuda.set_rng_state(rng["cuda"], device)

    # -- compile, then DDP (after freezing: DDP registers the parameters that need gradients)
    compiled = torch.compile(raw_model) if args.compile else raw_model
    model = DDP(compiled, device_ids=[device] if device.startswith("cuda") else None) if distributed else compiled

    # -- the loop
    log_path = os.path.join(args.out, "log.jsonl")
    tokens_per_step = args.batch_size * args.block_size * args.grad_accum * world_size
    if is_main:  # every input is checked: from here on the run folder is written
        os.makedirs(args.out, exist_ok=True)
        for name in replaced:  # --overwrite: the other run goes whole, before this one writes anything
            os.remove(os.path.join(args.out, name))
        keep = []  # on --resume, the log's records up to the checkpoint (a crash may have logged more)
        if args.resume and os.path.exists(log_path):
            with open(log_path) as f:
                keep = [line for line in f if line.strip() and json.loads(line)["step"] <= start_step]
        with atomic_path(log_path) as tmp, open(tmp, "w") as f:
            f.writelines(keep)

    def log(record: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(record) + "\n")

    if is_main and start_step == 0:
        log(dict(step=0, val_loss=evaluate(compiled, val_split, args, precision, device)))
    model.train()
    started, training_seconds = time.time(), 0.0  # the second leaves out evaluation and checkpoints
    bar = tqdm(range(start_step, args.max_iters), "training", initial=start_step, total=args.max_iters,
               disable=not is_main)
    saved_step = start_step if args.resume else None
    try:
        for step in bar:
            step_started = time.time()
            lr = learning_rate(step, args)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [get_batch(train_split, args.batch_size, args.block_size, batch_generator, device)
                       for _ in range(args.grad_accum)]  # fmt: skip
            train_loss = forward_backward(model, batches, precision, scaler)
            if args.grad_clip > 0:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if device.startswith("cuda"):
                torch.cuda.synchronize()  # for an honest tokens/s
            training_seconds += time.time() - step_started
            tokens_per_s = tokens_per_step * (step + 1 - start_step) / training_seconds  # mean over this run
            bar.set_postfix(loss=f"{train_loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")

            done = step + 1
            if done % args.eval_interval == 0 or done == args.max_iters:
                states = [rng_state(batch_generator, device)]
                if distributed:
                    states = [None] * world_size
                    dist.all_gather_object(states, rng_state(batch_generator, device))
                if is_main:
                    val_loss = evaluate(compiled, val_split, args, precision, device)  # the main process's alone
                    bar.write(f"step {done}: train loss {train_loss:.4f}, val loss {val_loss:.4f}")
                    log(dict(step=done, train_loss=train_loss, val_loss=val_loss, lr=lr, tokens_per_s=round(tokens_per_s),
                             elapsed_s=round(time.time() - started, 1)))  # fmt: skip
                    save_checkpoint(args, raw_model, optimizer, scaler, done, states)
                    saved_step = done
    except KeyboardInterrupt:
        bar.close()
        where = (f"the last checkpoint is step {saved_step} in {args.out}: --resume continues from it"
                 if saved_step is not None else "no checkpoint was written yet")  # fmt: skip
        print(f"train.py: interrupted at step {step}; {where}", file=sys.stderr)
        raise SystemExit(130) from None
    bar.close()

    if is_main and start_step < args.max_iters:
        written = os.path.join(args.out, "adapter.safetensors" if args.rank > 0 else "model.safetensors")
        print(f"{args.max_iters - start_step} steps in {time.time() - started:.0f} s, {tokens_per_s:,.0f} tokens/s "
              f"while training; wrote {written} ({os.path.getsize(written) / 1e6:.2f} MB)")  # fmt: skip
    if distributed:
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
