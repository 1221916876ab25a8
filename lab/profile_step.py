"""Where a training step's time goes: LoRA r=4 on q,v against full fine-tuning, under torch.profiler.

    python -m lab.profile_step                                         # a GPU: GPT-2 medium, 8 x 512, bf16
    python -m lab.profile_step --device cpu --size gpt2 --shape 4x256  # a CPU: GPT-2 small, float32 or bf16

Random weights, AdamW, the autocast dtype of --dtype and, for LoRA in 16 bits, the frozen base stored in
it: the setup of bench.py's training rows. Prints the median step time over --steps steps, then
torch.profiler's table over 3 more, sorted by the operators' own time. On a GPU its totals split the
time into the GPU's own work ("Self CUDA time total") and the CPU's work of issuing it ("Self CPU").
"""

import statistics
import sys

import torch
from torch.profiler import ProfilerActivity, profile

from bench import add_model_flags, build_model, check_model_flags, parse_shapes, timed
from lab import command_line
from lora import LoRAConfig, apply_lora
from train import freeze_base_in
from utils import autocast, describe_dtype, resolve_dtype

DEFAULTS = {"cpu": dict(size="gpt2", shape="4x256"), "cuda": dict(size="gpt2-medium", shape="8x512")}


def profile_step(size: str, rank: int, shape: tuple[int, int], device: str, dtype: torch.dtype, steps: int) -> None:
    torch.manual_seed(0)
    model = build_model(size, device)
    if rank:
        apply_lora(model, LoRAConfig(rank))
        freeze_base_in(model, dtype)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, fused=device.startswith("cuda"))
    x = torch.randint(model.config.vocab_size, shape, device=device)

    def step():
        with autocast(device, dtype):
            _, loss = model(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    seconds = [timed(step, device) for _ in range(steps)]
    print(
        f"=== {f'LoRA r={rank} q,v' if rank else 'full fine-tuning'}: median step {1000 * statistics.median(seconds):.1f} ms"
    )
    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]
    with profile(activities=activities) as profiler:
        for _ in range(3):
            timed(step, device)
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(profiler.key_averages().table(sort_by=sort_by, row_limit=14, max_name_column_width=60))


def main(argv: list[str] | None = None) -> None:
    parser = command_line("lab.profile_step", __doc__)
    add_model_flags(parser, "the autocast dtype (LoRA keeps its frozen base in it when it has 16 bits)")
    parser.add_argument("--shape", help="the batch, batch x sequence length; default 8x512 on a GPU, 4x256 on a CPU")
    parser.add_argument("--steps", type=int, default=10, help="timed steps before the profiled ones (default: 10)")
    args = parser.parse_args(argv)
    check_model_flags(args, DEFAULTS)  # default --size: gpt2-medium on a GPU, gpt2 on a CPU
    (shape,), dtype = parse_shapes(args.shape), resolve_dtype(args.device, args.dtype)
    print(f"{args.size}, {args.shape}, {args.device_name}, {describe_dtype(args.device, args.dtype)}")
    for rank in (0, 4):
        profile_step(args.size, rank, shape, args.device, dtype, args.steps)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"lab.profile_step: error: {e}")
