"""Turn a text file, or context→target pairs, into token files that train.py reads.

    python prepare_data.py                                   # tiny Shakespeare -> data/shakespeare/
    python prepare_data.py --input my.txt --name mine        # any local text   -> data/mine/
    python prepare_data.py --e2e                             # E2E NLG (the paper's Table 3) -> data/e2e/

Text is tokenised with tiktoken's GPT-2 BPE and split into `train.bin` / `val.bin`: flat uint16
arrays that np.memmap reads without loading them (nanoGPT's layout). `<|endoftext|>` between documents
becomes GPT-2's end-of-text token, as in its pre-training: the token that ends a target below. A
`meta.json` beside them says what they hold.

Pairs are the paper's setting (§2): maximise Σ_t log P(y_t | x, y_<t) over (context x, target y).
Each example is stored as

    context tokens, " ||", " " + target tokens, <|endoftext|>

one after another, and `train_mask.bin` / `val_mask.bin` (uint8, one byte per token) hold 1 where a
token belongs to the target or is its <|endoftext|>, 0 on the context and separator: train.py
computes the loss on mask-1 tokens only. A prompt for the adapted model is `context + " ||"`.

The last section reads a folder back for train.py (`open_data`, `load_split`), checked.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import os
import shutil
import sys
import urllib.request
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

from utils import read_text

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
# the E2E NLG splits in the LoRA authors' `context||target` format (paper §5.5, Table 3)
E2E_URL = "https://raw.githubusercontent.com/microsoft/LoRA/main/examples/NLG/data/e2e/{split}.txt"
END_OF_TEXT = "<|endoftext|>"  # in a text file: GPT-2's end-of-text token (50256), between documents
PAIR_SEPARATOR = " ||"  # between context and target; E2E's own marker, so prompts read naturally
LINES_PER_CHUNK = 2000  # text is tokenised in chunks of lines, for the progress bar
DEFAULT_DATA = os.path.join("data", "shakespeare")  # train.py's --data, prepared on first use


TOKENIZER = "tokenizer.tiktoken"  # in a data or model folder: the trimmed BPE its token ids are in (trim_encoding)


def load_encoding(folder: str | None = None):
    """The BPE of a data or model folder: its trimmed GPT-2 BPE (TOKENIZER, written by trim_encoding's
    users), else tiktoken's GPT-2 BPE. GPT-2's downloads two files once; offline, TIKTOKEN_CACHE_DIR must
    hold them."""
    import tiktoken

    if folder is not None and os.path.isfile(os.path.join(folder, TOKENIZER)):
        with open(os.path.join(folder, TOKENIZER), encoding="ascii") as f:
            return trimmed_encoding(f.read())
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # network errors come as many types; all mean the same to the user
        raise OSError(
            f"could not load tiktoken's gpt2 encoding ({type(e).__name__}): connect once, or set "
            "TIKTOKEN_CACHE_DIR to a folder holding its cached files"
        ) from None


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # tiktoken's gpt2


def trimmed_encoding(tokenizer: str):
    """The BPE of a TOKENIZER file's text (one `base64-token rank` a line): GPT-2's rules on fewer tokens."""
    import tiktoken

    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in tokenizer.splitlines())}
    return tiktoken.Encoding(
        "gpt2-trimmed", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={END_OF_TEXT: len(ranks)}
    )


def trim_encoding(texts: list[str]) -> str:
    """GPT-2's BPE cut down to the tokens `texts` are made of, as a TOKENIZER file's text. A small model
    trained from scratch never needs the rest of GPT-2's 50,257: each token's embedding and output row would
    be parameters and arithmetic for a word it never sees. What is kept: the 256 bytes, every token of
    `texts`, and every token BPE forms on the way to one (`pieces`), renumbered in GPT-2's merge order, so
    `texts` split into the same tokens as with GPT-2's BPE and any other text still encodes (into smaller
    pieces, down to bytes). <|endoftext|> comes last."""
    gpt2 = load_encoding()
    used = set().union(*(gpt2.encode(text, allowed_special={END_OF_TEXT}) for text in texts)) - {gpt2.eot_token}
    kept = {bytes([b]) for b in range(256)}
    for token in used:
        kept |= pieces(gpt2.decode_single_token_bytes(token), gpt2._mergeable_ranks)
    ranked = sorted(kept, key=gpt2._mergeable_ranks.__getitem__)
    return "".join(f"{base64.b64encode(token).decode()} {rank}\n" for rank, token in enumerate(ranked))


def pieces(token: bytes, ranks: dict[bytes, int]) -> set[bytes]:
    """Every token byte-pair encoding forms while it builds `token` from its bytes (`token` included):
    the pair of lowest rank is merged first, as tiktoken does. Within one token's bytes the merges are
    those of the token alone, whatever surrounds it."""
    parts, formed = [bytes([b]) for b in token], {token}
    while len(parts) > 1:
        rank, i = min((ranks.get(parts[i] + parts[i + 1], math.inf), i) for i in range(len(parts) - 1))
        if rank == math.inf:
            break
        parts[i : i + 2] = [parts[i] + parts[i + 1]]
        formed.add(parts[i])
    return formed


def download(url: str, what: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.read().decode("utf-8")
    except OSError as e:  # urllib's URLError is an OSError
        raise OSError(
            f"could not download {what} from {url} ({e}): get the file another way and pass it with --input"
        ) from None


def read_source(path: str | None, flag: str = "--input ") -> tuple[str, str]:
    """(text, where it came from): the local file `path` (given as `flag`), or tiny Shakespeare downloaded."""
    if path is None:
        return download(SHAKESPEARE_URL, "tiny Shakespeare"), SHAKESPEARE_URL
    return read_text(path, flag), path


# ---- plain text -----------------------------------------------------------------------------------


def tokenize_text(text: str, encoding) -> np.ndarray:
    """All tokens of `text`, encoded in chunks of whole lines (decoding them gives `text` back). The
    text `<|endoftext|>` is GPT-2's end-of-text token, the mark it was pre-trained with between documents."""
    lines = text.splitlines(keepends=True)
    chunks = ["".join(lines[i : i + LINES_PER_CHUNK]) for i in range(0, len(lines), LINES_PER_CHUNK)]
    tokens = [encoding.encode(c, allowed_special={END_OF_TEXT}) for c in tqdm(chunks, desc="tokenising", unit="chunk")]
    return np.concatenate([np.array(t, dtype=np.uint16) for t in tokens])


# ---- context -> target pairs ----------------------------------------------------------------------


def parse_pairs(text: str, source: str) -> list[tuple[str, str]]:
    """(context, target) from `context||target` lines, or from JSONL lines with `context` and
    `completion` fields when `source` ends in .jsonl. Blank lines are skipped."""
    pairs = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        if source.endswith(".jsonl"):
            try:
                record = json.loads(line)
                pair = (record["context"], record["completion"])
            except (json.JSONDecodeError, KeyError, TypeError):
                pair = None
            if pair is None or not all(isinstance(field, str) for field in pair):
                raise ValueError(f"{source}, line {number}: not a JSON object with 'context' and 'completion' strings")
        else:
            if "||" not in line:
                raise ValueError(f"{source}, line {number}: no '||' between context and target")
            pair = tuple(line.split("||", 1))
        context, target = (field.strip() for field in pair)
        for what, field in (("context", context), ("target", target)):
            if not field:
                raise ValueError(f"{source}, line {number}: empty {what}; every example needs a context and a target")
        pairs.append((context, target))
    return pairs


def tokenize_pairs(pairs: list[tuple[str, str]], encoding) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of every example, one after another, and the loss mask aligned with them."""
    separator = encoding.encode_ordinary(PAIR_SEPARATOR)
    tokens, mask = [], []
    for context, target in tqdm(pairs, desc="tokenising", unit="pair"):
        prompt = encoding.encode_ordinary(context) + separator
        completion = encoding.encode_ordinary(" " + target) + [encoding.eot_token]
        tokens += prompt + completion
        mask += [0] * len(prompt) + [1] * len(completion)
    return np.array(tokens, dtype=np.uint16), np.array(mask, dtype=np.uint8)


# ---- writing the folder ---------------------------------------------------------------------------


def write_folder(folder: str, arrays: dict[str, np.ndarray], meta: dict, texts: dict[str, str] | None = None) -> None:
    """Write every file into a temporary folder, then rename it into place: a crash leaves either
    the old folder or the new one, never half of one."""
    parent = os.path.dirname(os.path.abspath(folder))
    os.makedirs(parent, exist_ok=True)
    tmp, old = f"{folder}.tmp{os.getpid()}", f"{folder}.old{os.getpid()}"
    try:
        os.makedirs(tmp)
        for name, array in arrays.items():
            array.tofile(os.path.join(tmp, name))
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=2)
        for name, text in (texts or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        if os.path.exists(folder):
            os.replace(folder, old)  # a directory cannot be renamed onto a non-empty one
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)  # only once the new folder is in place


def prepare(
    input_path: str | None,
    name: str,
    format: str = "text",
    out_dir: str = "data",
    val_fraction: float = 0.1,
    val_path: str | None = None,
    tokenizer: str | None = None,
) -> str:
    """Tokenise `input_path` (tiny Shakespeare when None) into `out_dir/name/`; the validation split
    is `val_path` when given, else the end of the input. With GPT-2's BPE, or with `tokenizer` (a
    TOKENIZER file's text, trim_encoding's), which the folder then keeps. Returns the folder."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"--val-fraction must be between 0 and 1, got {val_fraction}")
    if not name or name in (".", "..") or any(sep and sep in name for sep in (os.sep, os.altsep)):
        raise ValueError(
            f"--name {name!r} must be a plain folder name, without a path separator: the folder goes under --out-dir"
        )
    folder = os.path.join(out_dir, name)
    for path, flag in ((out_dir, "--out-dir "), (folder, "")):
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"{flag}{path} is a file, not a folder: remove it or choose another --out-dir or --name")
    train = read_source(input_path)
    encoding = trimmed_encoding(tokenizer) if tokenizer else load_encoding()
    val = read_source(val_path, "--val-input ") if val_path else None
    arrays, meta = tokenize(train, val, format, val_fraction, encoding)
    write_folder(folder, arrays, meta, texts={TOKENIZER: tokenizer} if tokenizer else None)
    return folder


def prepare_e2e(out_dir: str = "data", name: str = "e2e") -> str:
    """The E2E NLG challenge as the LoRA authors distribute it: train.txt -> train.bin, valid.txt ->
    val.bin, and test.txt kept as it is, for `python -m lab.e2e --pairs <folder>/test.txt`."""
    sources = {
        split: (download(E2E_URL.format(split=split), f"E2E's {split}.txt"), E2E_URL.format(split=split))
        for split in ("train", "valid", "test")
    }
    arrays, meta = tokenize(sources["train"], sources["valid"], "pairs", 0.1, load_encoding())
    folder = os.path.join(out_dir, name)
    write_folder(folder, arrays, meta, texts={"test.txt": sources["test"][0]})
    return folder


def tokenize(
    train: tuple[str, str], val: tuple[str, str] | None, format: str, val_fraction: float, encoding
) -> tuple[dict[str, np.ndarray], dict]:
    """The arrays of a data folder and its meta.json, from (text, source) of the training input and
    of the validation input (None: the end of the training input is held out), in `encoding`'s tokens."""
    assert encoding.n_vocab <= np.iinfo(np.uint16).max + 1, "token ids must fit in uint16"
    meta = {
        "format": format,
        "tokenizer": encoding.name,
        "vocab_size": encoding.n_vocab,
        "eot_token": encoding.eot_token,
        "source": train[1],
        "val_source": val[1] if val else train[1],
    }
    if format == "text":
        tokens = tokenize_text(train[0], encoding)
        if val is not None:
            arrays = {"train.bin": tokens, "val.bin": tokenize_text(val[0], encoding)}
        else:
            n_val = int(len(tokens) * val_fraction)
            if n_val < 1:
                raise ValueError(f"{train[1]} is too short to split off a validation set ({len(tokens)} tokens)")
            arrays = {"train.bin": tokens[:-n_val], "val.bin": tokens[-n_val:]}
    else:
        pairs = parse_pairs(*train)
        if val is not None:
            train_pairs, val_pairs = pairs, parse_pairs(*val)
        else:
            # the last examples are held out: E2E lists several targets per context next to each
            # other, so a tail split keeps most val contexts unseen in training
            if len(pairs) < 2:
                raise ValueError(
                    f"{train[1]} holds {len(pairs)} pair(s); need at least 2 to split off a validation set"
                )
            n_val = min(max(1, round(len(pairs) * val_fraction)), len(pairs) - 1)
            train_pairs, val_pairs = pairs[:-n_val], pairs[-n_val:]
        (train_tokens, train_mask), (val_tokens, val_mask) = (
            tokenize_pairs(p, encoding) for p in (train_pairs, val_pairs)
        )
        arrays = {
            "train.bin": train_tokens,
            "train_mask.bin": train_mask,
            "val.bin": val_tokens,
            "val_mask.bin": val_mask,
        }
        meta.update(separator=PAIR_SEPARATOR, train_examples=len(train_pairs), val_examples=len(val_pairs))
    meta.update(train_tokens=len(arrays["train.bin"]), val_tokens=len(arrays["val.bin"]))
    return arrays, meta


# ---- reading a folder back, for train.py: token files through np.memmap ----------------------------


@dataclass
class Split:
    tokens: np.ndarray  # uint16 token ids
    mask: np.ndarray | None  # uint8, 1 where a token is a target (pairs), None for plain text
    starts: np.ndarray | None  # pairs: where a packed window may start (an example's first token)
    examples: np.ndarray | None  # pairs: (n_examples, 2) start and end of each example


def open_data(folder: str) -> dict:
    """meta.json of a data folder; the default Shakespeare folder is prepared if missing."""
    if folder == DEFAULT_DATA and not os.path.exists(folder):
        print(f"{folder} is missing: preparing tiny Shakespeare")
        prepare(None, "shakespeare", out_dir=os.path.dirname(folder))
    for name in ("meta.json", "train.bin", "val.bin"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f"{folder} is not a data folder (no {name}): make one with prepare_data.py")
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


def load_split(folder: str, split: str, block_size: int, eot_token: int, padded: bool = False) -> Split:
    """A split's tokens (and loss mask), checked: a file of the wrong size, or pairs whose windows
    would hold no target token (a loss over nothing), are errors naming the file."""
    path = os.path.join(folder, f"{split}.bin")
    if os.path.getsize(path) % 2:
        raise ValueError(f"{path} has an odd number of bytes: not uint16 token ids written by prepare_data.py")
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    mask_path = os.path.join(folder, f"{split}_mask.bin")
    if not os.path.exists(mask_path):
        if padded:
            raise ValueError(
                f"{folder} holds plain text: --batching padded needs pairs (prepare_data.py --format pairs)"
            )
        if len(tokens) <= block_size:
            raise ValueError(f"{path} has {len(tokens)} tokens, too few for --block-size {block_size}")
        return Split(tokens, None, None, None)
    mask = np.memmap(mask_path, dtype=np.uint8, mode="r")
    if len(mask) != len(tokens):
        raise ValueError(f"{mask_path} has {len(mask)} entries for the {len(tokens)} tokens of {path}")
    # every example ends with <|endoftext|>: an example runs from one start to the next
    starts = np.concatenate([[0], np.flatnonzero(np.asarray(tokens) == eot_token)[:-1] + 1])
    examples = np.stack([starts, np.append(starts[1:], len(tokens))], axis=1)
    if padded:
        longest = int((examples[:, 1] - examples[:, 0]).max())
        if longest - 1 > block_size:  # a row holds an example but its last token, which is only predicted
            raise ValueError(f"{path} has an example of {longest} tokens: use --block-size {longest - 1} or more")
        return Split(tokens, mask, None, examples)
    targets = np.flatnonzero(np.asarray(mask))
    if len(targets) == 0:
        raise ValueError(f"{mask_path} marks no target token")
    # a packed window starts on an example's first token, so a target is never seen without its
    # context; its y covers tokens start+1 .. start+block_size: keep the windows that reach a target
    first_target = targets[np.minimum(np.searchsorted(targets, starts), len(targets) - 1)]
    reaches = (first_target > starts) & (first_target - starts <= block_size) & (starts + block_size < len(tokens))
    if not reaches.any():
        raise ValueError(
            f"no window of --block-size {block_size} in {path} reaches a target token: the shortest context is "
            f"{int((first_target - starts).min())} tokens; use --block-size {int(np.diff(starts).max())} or more "
            "to see whole examples"
        )
    return Split(tokens, mask, starts[reaches], examples)


def check_token_ids(split: Split, path: str, vocab_size: int) -> None:
    """Token ids must index the model's embedding; found here, not as an index error at step 0."""
    largest = int(split.tokens.max())
    if largest >= vocab_size:
        raise ValueError(f"{path} holds token id {largest}, beyond the model's vocabulary of {vocab_size}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        description="Tokenise a text, or context→target pairs, with GPT-2's BPE into data/<name>/ for train.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--input", help="a local UTF-8 file; without it tiny Shakespeare is downloaded")
    parser.add_argument(
        "--name", help="the folder to write under --out-dir; if unset, shakespeare or the input file's name"
    )
    parser.add_argument(
        "--format",
        choices=("text", "pairs"),
        default="text",
        help="text: one running text. pairs: lines 'context||target', or JSONL with 'context' and "
        "'completion' fields when the file ends in .jsonl; loss is then on the target only",
    )
    parser.add_argument("--out-dir", default="data", help="where the <name> folder is written")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="share held out for validation (the end of the text, or the last pairs)",
    )
    parser.add_argument("--val-input", help="a local file to validate on, instead of holding out --val-fraction")
    parser.add_argument(
        "--e2e",
        action="store_true",
        help="download the E2E NLG splits in the LoRA authors' format into --out-dir/e2e (train, "
        "valid as val, and test.txt for python -m lab.e2e); local copies: --format pairs --input "
        "train.txt --val-input valid.txt",
    )
    args = parser.parse_args(argv)
    name = args.name or ("shakespeare" if args.input is None else os.path.splitext(os.path.basename(args.input))[0])
    if args.e2e and (args.input or args.val_input or args.format != "text"):
        parser.error("--e2e downloads its own files: leave out --input, --val-input and --format")
    try:
        if args.e2e:
            folder = prepare_e2e(args.out_dir, args.name or "e2e")
        else:
            folder = prepare(args.input, name, args.format, args.out_dir, args.val_fraction, args.val_input)
    except (ValueError, OSError) as e:
        sys.exit(f"prepare_data.py: error: {e}")
    with open(os.path.join(folder, "meta.json")) as f:
        meta = json.load(f)
    print(f"wrote {folder}/: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens ({meta['format']})")
    return folder


if __name__ == "__main__":
    main()
