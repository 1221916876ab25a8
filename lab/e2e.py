"""E2E NLG (the LoRA paper's Table 3): decode a split with beam search and score it with the challenge's metrics.

    python -m lab.e2e --run-dir out/e2e-lora --pairs data/e2e/test.txt
    python -m lab.e2e --run-dir out/e2e-full --pairs data/e2e/test.txt --limit 50   # a quick look

A LoRA run is decoded with its adapter merged into its base (§4.1: no added latency), a --rank 0
run as the whole model it wrote. Each meaning representation (the context of one or more
`context||target` lines) is prompted as `context ||`, as prepare_data.py stored the training
pairs, and decoded with the paper's settings (Table 11: beam 10, length penalty 0.9, no repeated
4-gram; the authors' published command uses length penalty 0.8). Writes, in --out (default: the
run folder's e2e-<split>/): predictions.txt (one line per context), references.txt (grouped, a
blank line between contexts: the official script's format) and scores.json, then prints the row.
"""

from __future__ import annotations

import json
import os
import sys
import time

from tqdm import tqdm

import prepare_data
import sample
from lab import command_line
from lab.beam_search import beam_search
from lab.e2e_metrics import METRICS, group_pairs, score
from lab.methods import load_method, method_file, read_method
from lora import load_adapter, merge_lora
from model import GPT
from utils import add_hardware_flags, atomic_path, for_inference, resolve_device, resolve_dtype

# Table 3 of the paper, GPT-2 medium (BLEU, METEOR, ROUGE-L in %, as the paper prints them).
PAPER_TABLE3 = {
    "GPT-2 M (FT)": (68.2, 8.62, 46.2, 71.0, 2.47),
    "GPT-2 M (Adapter^H, 11.09M)": (67.3, 8.50, 46.0, 70.7, 2.44),
    "GPT-2 M (LoRA, 0.35M)": (70.4, 8.85, 46.8, 71.8, 2.53),
}


def load_run(run_dir: str, base: str | None) -> tuple[GPT, str]:
    """The model a train.py run folder describes, ready to decode: base + merged adapter, the fully
    fine-tuned model, or base + a method's parameters (lab/methods.py); and a one-line description."""
    path = method_file(run_dir)
    if path:  # a method LoRA is compared with (Table 3): its parameters on its base
        base = base or read_method(path)[1]["base"]
        model = sample.load_base(base)
        return model, f"{base} + {load_method(model, path)}"
    base, adapter = sample.find_run(run_dir, None, base)
    model = sample.load_base(base)
    if adapter is None:
        return model, f"{base} (fully fine-tuned)"
    config = load_adapter(model, adapter)
    merge_lora(model)
    return model, f"{base} + LoRA r={config.rank} on {','.join(config.targets)}"


def decode(model: GPT, contexts: list[str], batch_size: int, max_new_tokens: int, **beam) -> list[str]:
    """One line of text per context, in their order: beam search from `context ||`, batch_size contexts at a
    time, the contexts batched shortest first."""
    encoding = sample.model_encoding(model)
    separator = encoding.encode_ordinary(prepare_data.PAIR_SEPARATOR)
    prompts = [encoding.encode_ordinary(context) + separator for context in contexts]
    # Prompts of one length together: a batch reads its prompts in one pass, where a longer prompt would be
    # fed a token a step to all its beams (the 630 test MRs: 11% less time, the same texts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[list[int]] = [[] for _ in prompts]
    for start in tqdm(range(0, len(prompts), batch_size), desc="beam search", unit="batch"):
        batch = order[start : start + batch_size]
        found = beam_search(model, [prompts[i] for i in batch], max_new_tokens, eos_token_id=encoding.eot_token, **beam)
        for i, tokens in zip(batch, found):
            outputs[i] = tokens
    return [" ".join(encoding.decode(tokens).split()) for tokens in outputs]  # one line each


def table_row(name: str, scores: dict[str, float]) -> str:
    """A markdown row in the paper's units: BLEU, METEOR and ROUGE-L in %, NIST and CIDEr as they are."""
    percent = {"BLEU", "METEOR", "ROUGE_L"}
    cells = [f"{100 * scores[m]:.1f}" if m in percent else f"{scores[m]:.2f}" for m in METRICS]
    return f"| {name} | " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = command_line("lab.e2e", __doc__)
    parser.add_argument("--run-dir", default="out", help="a train.py run folder (default: %(default)s)")
    parser.add_argument("--base", help="the base, if not the one the run names")
    parser.add_argument("--pairs", required=True, help="the split to decode: `context||target` lines (E2E test.txt)")
    parser.add_argument("--out", help="where the predictions, references and scores go (default: RUN_DIR/e2e-<split>)")
    parser.add_argument("--num-beams", type=int, default=10, help="beam size (Table 11: 10)")
    parser.add_argument(
        "--length-penalty",
        type=float,
        default=0.9,
        help="a finished beam scores Σ log p / length^this (Table 11: 0.9; the authors' command: 0.8)",
    )
    parser.add_argument("--no-repeat-ngram-size", type=int, default=4, help="(Table 11: 4; 0: off)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="the longest text decoded (the authors': 64)")
    parser.add_argument("--batch-size", type=int, default=16, help="contexts decoded together (× beams rows)")
    parser.add_argument("--limit", type=int, help="decode only the first N contexts, for a quick look")
    add_hardware_flags(parser)
    args = parser.parse_args(argv)
    if min(args.num_beams, args.max_new_tokens, args.batch_size, args.limit or 1) < 1 or args.no_repeat_ngram_size < 0:
        parser.error(
            "--num-beams, --max-new-tokens, --batch-size and --limit must be >= 1, --no-repeat-ngram-size >= 0"
        )
    try:
        contexts, references = group_pairs(args.pairs)
        contexts, references = contexts[: args.limit], references[: args.limit]
        out = args.out or os.path.join(args.run_dir, f"e2e-{os.path.splitext(os.path.basename(args.pairs))[0]}")
        device = resolve_device(args.device)
        dtype = resolve_dtype(device, args.dtype)  # checked before the model loads
        model, name = load_run(args.run_dir, args.base)
        for_inference(model, device, dtype)
        print(f"{name}: {len(contexts)} contexts, {sum(map(len, references))} references from {args.pairs}")
        started = time.time()
        predictions = decode(
            model,
            contexts,
            args.batch_size,
            args.max_new_tokens,
            num_beams=args.num_beams,
            length_penalty=args.length_penalty,
            no_repeat_ngram_size=args.no_repeat_ngram_size,
        )
        seconds = time.time() - started
        os.makedirs(out, exist_ok=True)
        with atomic_path(os.path.join(out, "predictions.txt")) as tmp, open(tmp, "w") as f:
            f.writelines(p + "\n" for p in predictions)
        with atomic_path(os.path.join(out, "references.txt")) as tmp, open(tmp, "w") as f:
            f.write("\n".join("".join(r + "\n" for r in group) for group in references))
        scores = score(predictions, references)
        with atomic_path(os.path.join(out, "scores.json")) as tmp, open(tmp, "w") as f:
            json.dump(
                {
                    "model": name,
                    "pairs": args.pairs,
                    "contexts": len(contexts),
                    "decode_s": round(seconds, 1),
                    "settings": {
                        k: getattr(args, k)
                        for k in ("num_beams", "length_penalty", "no_repeat_ngram_size", "max_new_tokens")
                    },
                    **scores,
                },
                f,
                indent=1,
            )
    except (ValueError, OSError) as e:
        sys.exit(f"lab.e2e: error: {e}")
    print(f"decoded in {seconds:.0f} s; wrote {out}/predictions.txt, references.txt, scores.json\n")
    print("| model | BLEU | NIST | METEOR | ROUGE-L | CIDEr |\n|---|---|---|---|---|---|")
    print(table_row(name, scores))
    for paper_name, row in PAPER_TABLE3.items():
        print(f"| paper: {paper_name} | " + " | ".join(f"{v:g}" for v in row) + " |")
    return scores


if __name__ == "__main__":
    main()
