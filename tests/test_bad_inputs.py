"""Bad inputs and faults, tried the way a careful user would: every script must refuse each one
with one line, `<script>.py: error: <what is wrong>` (or argparse's `usage:` + `error:` pair),
a non-zero exit, no traceback, and every file that existed before left byte for byte as it was.

Each row of CASES runs its script as a subprocess, in a folder of its own that its setup fills,
against tiny models and adapters built once. Importing torch is most of a run's time, so the
selected rows run concurrently, one per CPU, before their tests check the outcomes.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import ROOT
from lab.peft_interop import export_peft
from lora import LoRAConfig, apply_lora, lora_layers, save_adapter
from model import GPT, GPTConfig

Setup = Callable[[Path, Path], None]  # (the case's folder, the shared fixtures' folder)

# GPT-2's vocabulary (sample.py needs it), everything else as small as it goes
BPE_TINY = GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)
SMALL_VOCAB = GPTConfig(block_size=16, vocab_size=101, n_layer=1, n_head=2, n_embd=8)


@dataclass(frozen=True)
class Case:
    id: str
    script: str
    argv: tuple[str, ...]  # "{fx}" stands for the shared fixtures' folder
    expected: tuple[str, ...]  # each must be in the error line
    setup: Setup | None = None


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stderr: str
    before: dict[str, str]  # path -> sha256 of every file in the case's folder, before the run
    after: dict[str, str]


# ---- setups --------------------------------------------------------------------------------------


def files(contents: dict[str, str | bytes]) -> Setup:
    """Write each file (parent folders made); a name ending in / is an empty folder."""

    def setup(folder: Path, fx: Path) -> None:
        for name, content in contents.items():
            path = folder / name
            if name.endswith("/"):
                path.mkdir(parents=True, exist_ok=True)
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def checkpoint(config: dict | None = None, config_text: str | None = None, weights: bytes | None = None) -> Setup:
    """`m/`: a copy of the tiny base with its config.json updated by `config` (a None value drops
    the key) or replaced by `config_text`, or its model.safetensors replaced by `weights`."""

    def setup(folder: Path, fx: Path) -> None:
        shutil.copytree(fx / "base", folder / "m")
        if config is not None:
            hf = json.loads((folder / "m" / "config.json").read_text())
            hf = {k: v for k, v in {**hf, **config}.items() if v is not None}
            (folder / "m" / "config.json").write_text(json.dumps(hf))
        if config_text is not None:
            (folder / "m" / "config.json").write_text(config_text)
        if weights is not None:
            (folder / "m" / "model.safetensors").write_bytes(weights)

    return setup


def peft_folder(
    config: dict | None = None, tensors: Callable[[dict], dict] | None = None, header: str | None = None
) -> Setup:
    """`peft/`: the PEFT export of adapter a (q,v, r = 2), its adapter_config.json updated by
    `config`; `tensors` edits its tensors, then saved as PEFT saves them (without our header), or
    with `header` as our LoRA settings in it."""

    def setup(folder: Path, fx: Path) -> None:
        shutil.copytree(fx / "peft", folder / "peft")
        config_path = folder / "peft" / "adapter_config.json"
        weights_path = folder / "peft" / "adapter_model.safetensors"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **(config or {})}))
        if tensors is not None or header is not None:
            metadata = {"format": "pt", "lora_py_config": header} if header is not None else None
            save_file((tensors or dict)(load_file(weights_path)), weights_path, metadata)

    return setup


def adapter_header(lora_config: str) -> Setup:
    """`x.safetensors`: adapter a with the JSON text `lora_config` as the LoRA settings in its header."""

    def setup(folder: Path, fx: Path) -> None:
        with safe_open(fx / "a.safetensors", framework="pt") as f:
            metadata = f.metadata()
        save_file(load_file(fx / "a.safetensors"), folder / "x.safetensors", {**metadata, "lora_config": lora_config})

    return setup


def train_state(lora: dict) -> Setup:
    """`run/train_state.pt`: a state as train.py writes it, for a TINY_SCRATCH run with these stored LoRA settings."""

    def setup(folder: Path, fx: Path) -> None:
        settings = {"base": "scratch", "scratch_shape": [1, 2, 8, 8], "lora": lora, "batching": "packed"}
        state = {"step": 1, "trained": {}, "optimizer": {}, "scaler": {}, "rng": [{}], "settings": settings}
        (folder / "run").mkdir()
        torch.save(state, folder / "run" / "train_state.pt")

    return setup


def both(*setups: Setup) -> Setup:
    def setup(folder: Path, fx: Path) -> None:
        for one in setups:
            one(folder, fx)

    return setup


PEFT_A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
PEFT_B = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"
NOT_UTF8 = b"caf\xe9 \xff\xfe\n" * 4
TINY_SCRATCH = ("--data", "{fx}/data", "--base", "scratch", "--n-layer", "1", "--n-head", "2", "--n-embd", "8", "--block-size", "8", "--device", "cpu")  # fmt: skip

# ---- the table -----------------------------------------------------------------------------------

# fmt: off
# one case a line: read it as a table (the formatter would spread each case over seven lines)
CASES = [
    # prepare_data.py: the input file
    Case("prepare-missing-input", "prepare_data.py", ("--input", "nope.txt"), ("--input nope.txt", "no such file")),
    Case("prepare-input-is-folder", "prepare_data.py", ("--input", "texts"), ("--input texts", "folder"), files({"texts/": ""})),
    Case("prepare-input-not-utf8", "prepare_data.py", ("--input", "latin1.txt"), ("latin1.txt", "UTF-8"), files({"latin1.txt": NOT_UTF8})),
    Case("prepare-input-empty", "prepare_data.py", ("--input", "empty.txt"), ("empty.txt is empty",), files({"empty.txt": " \n\n"})),
    Case("prepare-text-too-short", "prepare_data.py", ("--input", "hi.txt"), ("too short",), files({"hi.txt": "hi"})),
    Case("prepare-pairs-no-separator", "prepare_data.py", ("--format", "pairs", "--input", "p.txt"), ("p.txt, line 2", "no '||'"), files({"p.txt": "a||b\njust text\n"})),
    Case("prepare-pairs-empty-target", "prepare_data.py", ("--format", "pairs", "--input", "p.txt"), ("p.txt, line 2", "empty target"), files({"p.txt": "a||b\nname[x]||   \nc||d\n"})),
    Case("prepare-pairs-empty-context", "prepare_data.py", ("--format", "pairs", "--input", "p.txt"), ("p.txt, line 1", "empty context"), files({"p.txt": "  || a target\nc||d\n"})),
    Case("prepare-jsonl-not-strings", "prepare_data.py", ("--format", "pairs", "--input", "p.jsonl"), ("p.jsonl, line 1", "'context' and 'completion'"), files({"p.jsonl": '{"context": 1, "completion": "b"}\n'})),
    Case("prepare-one-pair", "prepare_data.py", ("--format", "pairs", "--input", "p.txt"), ("at least 2",), files({"p.txt": "a||b\n"})),
    # prepare_data.py: where it writes
    Case("prepare-out-dir-is-file", "prepare_data.py", ("--input", "t.txt", "--out-dir", "data"), ("--out-dir data", "not a folder"), files({"t.txt": "some text\n" * 50, "data": "a file"})),
    Case("prepare-target-is-file", "prepare_data.py", ("--input", "t.txt", "--out-dir", "data", "--name", "x"), ("data/x", "not a folder"), files({"t.txt": "some text\n" * 50, "data/x": "a file"})),
    Case("prepare-name-with-separator", "prepare_data.py", ("--input", "t.txt", "--name", "a/b"), ("--name", "'a/b'"), files({"t.txt": "some text\n" * 50})),
    Case("prepare-name-dot-dot", "prepare_data.py", ("--input", "t.txt", "--name", ".."), ("--name", "'..'"), files({"t.txt": "some text\n" * 50})),
    Case("prepare-val-fraction", "prepare_data.py", ("--input", "t.txt", "--val-fraction", "1.5"), ("--val-fraction", "1.5"), files({"t.txt": "some text\n" * 50})),
    Case("prepare-unknown-format", "prepare_data.py", ("--format", "csv"), ("--format", "invalid choice")),
    # sample.py: what to load
    Case("sample-missing-run-dir", "sample.py", ("--run-dir", "nowhere"), ("--run-dir nowhere", "no such folder")),
    Case("sample-run-dir-is-file", "sample.py", ("--run-dir", "notes.txt"), ("--run-dir notes.txt", "not a folder"), files({"notes.txt": "x"})),
    Case("sample-adapter-not-safetensors", "sample.py", ("--adapter", "a.safetensors"), ("a.safetensors is not a safetensors file",), files({"a.safetensors": "plain text"})),
    Case("sample-adapter-is-a-model", "sample.py", ("--adapter", "{fx}/base/model.safetensors"), ("model.safetensors is not an adapter",)),
    Case("sample-base-too-small-vocab", "sample.py", ("--base", "{fx}/small"), ("vocabulary (101)",)),
    Case("sample-adapter-lora-alpha-not-a-number", "sample.py", ("--adapter", "x.safetensors"), ("x.safetensors has LoRA settings", "alpha must be > 0, got 'x'"), adapter_header('{"rank": 2, "alpha": "x"}')),
    Case("sample-adapter-of-other-shape", "sample.py", ("--adapter", "{fx}/a.safetensors", "--base", "{fx}/small"), ("a.safetensors was trained on another base",)),
    # sample.py: prompts and flags
    Case("sample-prompt-file-missing", "sample.py", ("--base", "{fx}/base", "--prompt", "FILE:nope.txt"), ("--prompt FILE:nope.txt", "no such file")),
    Case("sample-prompt-file-not-utf8", "sample.py", ("--base", "{fx}/base", "--prompt", "FILE:p.txt"), ("p.txt", "UTF-8"), files({"p.txt": NOT_UTF8})),
    Case("sample-prompt-empty", "sample.py", ("--base", "{fx}/base", "--prompt", ""), ("--prompt", "empty")),
    Case("sample-num-samples-0", "sample.py", ("--num-samples", "0"), ("--num-samples",)),
    Case("sample-unknown-device", "sample.py", ("--base", "{fx}/base", "--device", "gpu"), ("unknown device 'gpu'",)),
    Case("model-config-not-json", "sample.py", ("--base", "m"), ("config.json is not JSON",), checkpoint(config_text="{n_layer: 1")),
    Case("model-config-lacks-key", "sample.py", ("--base", "m"), ("config.json", "n_layer"), checkpoint(config={"n_layer": None})),
    Case("model-heads-do-not-divide", "sample.py", ("--base", "m"), ("n_embd 8", "n_head 3"), checkpoint(config={"n_head": 3})),
    Case("model-weights-not-safetensors", "sample.py", ("--base", "m"), ("model.safetensors is not a safetensors file",), checkpoint(weights=b"\x00" * 64)),
    Case("model-weights-other-shape", "sample.py", ("--base", "m"), ("model.safetensors", "shape"), checkpoint(config={"n_embd": 16})),
    Case("model-base-is-file", "sample.py", ("--base", "notes.txt"), ("notes.txt", "not a"), files({"notes.txt": "x"})),
    # analysis.py
    Case("analysis-no-matrix-in-common", "lab.analysis", ("similarity", "{fx}/a.safetensors", "{fx}/b.safetensors"), ("no matrix in common", "q, v", "o")),
    Case("analysis-different-bases", "lab.analysis", ("similarity", "{fx}/a.safetensors", "{fx}/c.safetensors"), ("a.safetensors", "c.safetensors", "different bases")),
    Case("analysis-layer-out-of-range", "lab.analysis", ("similarity", "{fx}/a.safetensors", "{fx}/a.safetensors", "--layers", "3"), ("layer 3 does not exist",)),
    Case("analysis-out-is-file", "lab.analysis", ("similarity", "{fx}/a.safetensors", "{fx}/a.safetensors", "--out", "notes.txt"), ("--out notes.txt", "not a folder"), files({"notes.txt": "x"})),
    Case("analysis-amplification-other-base", "lab.analysis", ("amplification", "{fx}/a.safetensors", "{fx}/c.safetensors"), ("c.safetensors", "weights differ")),
    # peft_interop.py
    Case("peft-no-config", "lab.peft_interop", ("import", "p", "--out", "x.safetensors"), ("p is not a PEFT folder", "adapter_config.json"), files({"p/": ""})),
    Case("peft-config-not-json", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("adapter_config.json is not JSON",), both(peft_folder(), files({"peft/adapter_config.json": "{r: 2"}))),
    Case("peft-targets-of-another-model", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("target_modules", "q_proj"), peft_folder({"target_modules": ["q_proj", "v_proj"]})),
    Case("peft-targets-lm-head", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("target_modules", "lm_head"), peft_folder({"target_modules": ["c_attn", "lm_head"]})),
    Case("peft-dora", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("use_dora",), peft_folder({"use_dora": True})),
    Case("peft-lora-bias", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("lora_bias",), peft_folder({"lora_bias": True})),
    Case("peft-init-changes-base", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("init_lora_weights", "pissa"), peft_folder({"init_lora_weights": "pissa"})),
    Case("peft-layers-to-transform", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("layers_to_transform", "layer 0"), peft_folder({"layers_to_transform": [3]})),
    Case("peft-missing-lora-b", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("lora_B", "layer 0"), peft_folder(tensors=lambda t: {k: v for k, v in t.items() if k != PEFT_B})),
    Case("peft-lora-b-wrong-shape", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("lora_B", "(24, 3)"), peft_folder(tensors=lambda t: {**t, PEFT_B: t[PEFT_B][:, :3].contiguous()})),
    Case("peft-rank-not-as-configured", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("rank 4", "says 2"), peft_folder({"rank_pattern": {}, "alpha_pattern": {}}, tensors=dict)),
    Case("peft-header-unknown-lora-setting", "lab.peft_interop", ("import", "peft", "--out", "x.safetensors"), ("adapter_model.safetensors has LoRA settings", "use_rslora"), peft_folder(header='{"rank": 2, "alpha": 4, "targets": ["q", "v"], "use_rslora": true}')),
    Case("peft-export-out-is-file", "lab.peft_interop", ("export", "{fx}/a.safetensors", "--out", "notes.txt"), ("--out notes.txt", "not a folder"), files({"notes.txt": "x"})),
    # bench.py: flags are checked before any measuring
    Case("bench-unknown-device", "bench.py", ("--device", "gpu"), ("unknown device 'gpu'",)),
    Case("bench-bad-shape", "bench.py", ("--device", "cpu", "--shapes", "4by256"), ("bad shape '4by256'",)),
    # train.py: bad input that needs nothing loaded
    Case("train-negative-rank", "train.py", ("--rank", "-1"), ("--rank must be >= 0",)),
    Case("train-unknown-target", "train.py", ("--targets", "q,query"), ("unknown LoRA target", "query")),
    Case("train-unknown-device", "train.py", ("--device", "gpu"), ("unknown device 'gpu'",)),
    Case("train-heads-do-not-divide", "train.py", ("--data", "{fx}/data", "--base", "scratch", "--n-head", "5", "--n-embd", "16", "--block-size", "8"), ("n_embd 16", "n_head 5")),
    Case("train-resume-empty-state", "train.py", ("--resume", "--run-dir", "run", *TINY_SCRATCH), ("run/train_state.pt is empty",), files({"run/train_state.pt": b""})),
    Case("train-resume-one-byte-state", "train.py", ("--resume", "--run-dir", "run", *TINY_SCRATCH), ("run/train_state.pt is truncated or corrupt",), files({"run/train_state.pt": b"\x80"})),
    Case("train-resume-unknown-lora-setting", "train.py", ("--resume", "--run-dir", "run", *TINY_SCRATCH), ("train_state.pt has LoRA settings", "use_rslora"), train_state({"rank": 4, "alpha": 8.0, "targets": ["q", "v"], "use_rslora": True})),
]
# fmt: on

if not torch.cuda.is_available():
    CASES.append(
        Case(
            "sample-cuda-without-cuda",
            "sample.py",
            ("--base", "{fx}/base", "--device", "cuda"),
            ("CUDA is not available", "--device cpu"),
        )
    )


# ---- running them ----------------------------------------------------------------------------------


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by its path relative to it."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def fx(tmp_path_factory) -> Path:
    """Tiny bases and adapters that the cases name as {fx}/...: base (GPT-2's vocabulary), base2
    (another seed, same shape), small (vocabulary 101); adapters a (q,v) and b (o) of base, c (q,v)
    of base2; peft/, a's PEFT export; data/, a prepare_data.py folder of random tokens."""
    folder = tmp_path_factory.mktemp("fixtures")
    for seed, name, config in ((0, "base", BPE_TINY), (1, "base2", BPE_TINY), (2, "small", SMALL_VOCAB)):
        torch.manual_seed(seed)
        GPT(config).save_pretrained(str(folder / name))
    for name, base, targets in (("a", "base", ("q", "v")), ("b", "base", ("o",)), ("c", "base2", ("q", "v"))):
        model = apply_lora(GPT.from_pretrained(str(folder / base)), LoRAConfig(rank=2, alpha=4, targets=targets))
        with torch.no_grad():
            for layer in lora_layers(model):
                for B in layer.lora_B.values():
                    B.normal_(0, 1.0)
        save_adapter(model, str(folder / f"{name}.safetensors"))
    export_peft(str(folder / "a.safetensors"), str(folder / "peft"))
    data = folder / "data"
    data.mkdir()
    for split, n in (("train", 2000), ("val", 200)):
        np.random.default_rng(0).integers(0, 50257, n, dtype=np.uint16).tofile(data / f"{split}.bin")
    meta = {
        "format": "text",
        "tokenizer": "gpt2",
        "vocab_size": 50257,
        "eot_token": 50256,
        "source": "random",
        "train_tokens": 2000,
        "val_tokens": 200,
    }
    (data / "meta.json").write_text(json.dumps(meta))
    return folder


def run_case(case: Case, folder: Path, fx: Path) -> Outcome:
    folder.mkdir()
    if case.setup is not None:
        case.setup(folder, fx)
    before = hashes(folder)
    env = {
        "TIKTOKEN_CACHE_DIR": os.path.join(os.path.dirname(ROOT), "shared", "tiktoken"),
        **os.environ,
        "OMP_NUM_THREADS": "1",
    }
    argv = [arg.replace("{fx}", str(fx)) for arg in case.argv]
    command = [sys.executable, "-m", case.script] if case.script.startswith("lab.") else [sys.executable, case.script]
    env["PYTHONPATH"] = ROOT  # python -m lab.<name> from the case's own folder
    process = subprocess.run(
        [*command[:-1], os.path.join(ROOT, command[-1]) if command[-1].endswith(".py") else command[-1], *argv],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return Outcome(process.returncode, process.stderr, before, hashes(folder))


@pytest.fixture(scope="module")
def fx_hashes(fx) -> dict[str, str]:
    return hashes(fx)


@pytest.fixture(scope="module")
def outcomes(request, fx, fx_hashes, tmp_path_factory) -> dict[str, Outcome]:
    """Run every selected case at once, one subprocess per CPU."""
    selected = [
        item.callspec.params["case"]
        for item in request.session.items
        if item.path == request.path and hasattr(item, "callspec") and "case" in item.callspec.params
    ]
    root = tmp_path_factory.mktemp("cases")
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        futures = {case.id: pool.submit(run_case, case, root / case.id, fx) for case in selected}
        return {case_id: future.result() for case_id, future in futures.items()}


def test_the_table_is_wide_enough():
    assert len({case.id for case in CASES}) == len(CASES) >= 30
    assert {case.script for case in CASES} >= {"prepare_data.py", "sample.py", "lab.analysis", "lab.peft_interop"}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_changes_nothing(case: Case, outcomes, fx, fx_hashes):
    outcome = outcomes[case.id]
    assert outcome.returncode != 0, f"exit 0; stderr: {outcome.stderr}"
    assert "Traceback" not in outcome.stderr, outcome.stderr
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert lines, "nothing on stderr"
    # ours is `sample.py: error: ...`; argparse's is `usage: ...` then `lab.analysis [command]: error: ...`
    assert re.match(rf"{re.escape(case.script)}( \w+)?: error: ", lines[-1]), outcome.stderr
    missing = [text for text in case.expected if text not in lines[-1]]
    assert not missing, f"{missing} not in: {lines[-1]}"
    assert outcome.after == outcome.before, "files in the case's folder changed"
    assert hashes(fx) == fx_hashes, "the shared fixtures changed"
