"""Where a training step's time goes on a GPU: LoRA r=4 on q,v against full fine-tuning.

    python -m lab.profile_step

GPT-2 medium (random weights), one batch of 8 x 512 tokens, bf16 autocast, fused AdamW: the
training shape of `bench.py --device cuda`. Prints the median step time over 10 steps, then
torch.profiler's table over 3 more, whose totals split the time into the GPU's own work
("Self CUDA time total") and the CPU's work of issuing it ("Self CPU time total").
"""

import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

from lora import LoRAConfig, apply_lora
from model import GPT, PRETRAINED
from utils import autocast


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit(
            "lab.profile_step: error: this profiles a GPU step and needs CUDA (torch.cuda.is_available() is False)"
        )
    for rank in (0, 4):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = GPT(PRETRAINED["gpt2-medium"])
        if rank:
            apply_lora(model, LoRAConfig(rank))
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
        x = torch.randint(model.config.vocab_size, (8, 512), device="cuda")

        def step():
            with autocast("cuda", torch.bfloat16):
                _, loss = model(x, x)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(5):
            step()
        seconds = []
        for _ in range(10):
            torch.cuda.synchronize()
            start = time.perf_counter()
            step()
            torch.cuda.synchronize()
            seconds.append(time.perf_counter() - start)
        print(
            f"=== {'full fine-tuning' if rank == 0 else f'LoRA r={rank} q,v'}: median step {1000 * statistics.median(seconds):.1f} ms"
        )
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
