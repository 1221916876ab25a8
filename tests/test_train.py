import json
import os
import shutil
import socket
import subprocess
import sys
from contextlib import nullcontext

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import prepare_data
import train
from conftest import ROOT, english_text
from lora import load_adapter, read_adapter
from model import GPT, GPTConfig

CHAR_VOCAB = 128  # the tests' corpus is English text, one token per ASCII character
BASE = GPTConfig(block_size=32, vocab_size=CHAR_VOCAB, n_layer=2, n_head=2, n_embd=128)
SCRATCH = ["--base", "scratch", "--n-layer", "2", "--n-head", "2", "--n-embd", "32"]
TINY_RUN = [
    "--block-size",
    "32",
    "--batch-size",
    "4",
    "--grad-accum",
    "2",
    "--eval-iters",
    "4",
    "--warmup-iters",
    "5",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def char_data(tmp_path_factory) -> str:
    """20,000 characters of English as a prepare_data.py folder, one token per character: text a tiny
    model learns within a few dozen steps, and no tokenizer needed."""
    tokens = np.frombuffer(english_text(20_000).encode("ascii"), dtype=np.uint8).astype(np.uint16)
    folder = str(tmp_path_factory.mktemp("data") / "chars")
    meta = dict(format="text", tokenizer="ascii", vocab_size=CHAR_VOCAB, eot_token=0)
    prepare_data.write_folder(folder, {"train.bin": tokens[:18_000], "val.bin": tokens[18_000:]}, meta)
    return folder


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory) -> str:
    """A random base written by save_pretrained, as a --rank 0 run writes one."""
    torch.manual_seed(0)
    folder = str(tmp_path_factory.mktemp("base"))
    GPT(BASE).save_pretrained(folder)
    return folder


def read_log(out) -> list[dict]:
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_training_from_scratch_lowers_val_loss(tmp_path, char_data):
    out = str(tmp_path / "out")
    run = [*SCRATCH, "--rank", "0", "--lr", "3e-3", *TINY_RUN, "--max-iters", "40", "--eval-interval", "20"]
    train.main([*run, "--data", char_data, "--run-dir", out])
    log = read_log(out)
    assert [record["step"] for record in log] == [0, 20, 40]
    assert log[-1]["val_loss"] < log[0]["val_loss"] - 1.0  # from ln(128) = 4.85 at random init
    trained = GPT.from_pretrained(out)  # --rank 0 writes a full model that loads back
    assert trained.config.n_embd == 32


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lora_run_keeps_base_bit_identical_and_writes_a_small_adapter(tmp_path, char_data, base_folder, dtype):
    """The frozen base is the base, bit for bit: in fp32, or cast once to bf16 (LoRA's 16-bit base)."""
    out = str(tmp_path / "out")
    run = ["--base", base_folder, "--rank", "4", *TINY_RUN, "--max-iters", "5", "--dtype", dtype]
    model = train.main([*run, "--data", char_data, "--run-dir", out])
    base = GPT.from_pretrained(base_folder).state_dict()
    trained = model.state_dict()
    for key, weight in base.items():
        assert torch.equal(trained[key], weight.to(getattr(torch, dtype))), key

    tensors, metadata = read_adapter(os.path.join(out, "adapter.safetensors"))
    assert set(tensors) == {k for k in trained if ".lora_A." in k or ".lora_B." in k}
    assert len(tensors) == 2 * 2 * BASE.n_layer  # A and B for q and v in each block
    assert all(tensors[k].abs().sum() > 0 for k in tensors if ".lora_B." in k)  # B left zero: it trained
    assert metadata["base"] == base_folder
    assert not os.path.exists(os.path.join(out, "model.safetensors"))
    adapter_size = os.path.getsize(os.path.join(out, "adapter.safetensors"))
    full_size = os.path.getsize(os.path.join(base_folder, "model.safetensors"))
    assert adapter_size < 0.02 * full_size, (adapter_size, full_size)


def test_pairs_loss_is_the_mean_over_target_tokens_of_the_whole_step(tmp_path):
    # two examples: context, separator (4), target, end-of-text (100); mask 1 on target and end-of-text
    first, second = [1, 2, 3, 4, 5, 6, 100], [7, 8, 4, 9, 10, 11, 12, 100]
    tokens = np.array(first + second + first, dtype=np.uint16)
    mask = np.array([0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1, 1] + [0, 0, 0, 0, 1, 1, 1], dtype=np.uint8)
    folder = str(tmp_path / "pairs")
    prepare_data.write_folder(folder, {"train.bin": tokens, "train_mask.bin": mask}, {})
    split = prepare_data.load_split(folder, "train", block_size=6, eot_token=100)
    assert split.starts.tolist() == [0, 7, 15]  # windows start on an example's first token

    batches, generator = {}, torch.Generator().manual_seed(0)
    while len(batches) < 2:  # draw until windows on both kinds of example came up
        x, y = train.packed_batch(split, 1, 6, generator, "cpu")
        batches[x[0, 0].item()] = (x, y)
    (x1, y1), (x2, y2) = batches[1], batches[7]
    assert x1.tolist() == [[1, 2, 3, 4, 5, 6]] and y1.tolist() == [[-1, -1, -1, 5, 6, 100]]
    assert x2.tolist() == [[7, 8, 4, 9, 10, 11]] and y2.tolist() == [[-1, -1, 9, 10, 11, 12]]

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=101, n_layer=1, n_head=2, n_embd=16))
    no_scaling = torch.amp.GradScaler("cpu", enabled=False)
    loss = train.forward_backward(model, [(x1, y1), (x2, y2)], nullcontext(), no_scaling)
    step_grad = model.lm_head.weight.grad.clone()

    # by hand: -log p of each target token (3 in the first window, 4 in the second), averaged over all 7
    model.zero_grad()
    log_p1 = F.log_softmax(model(x1)[0][0], dim=-1)
    log_p2 = F.log_softmax(model(x2)[0][0], dim=-1)
    terms = [log_p1[3, 5], log_p1[4, 6], log_p1[5, 100], log_p2[2, 9], log_p2[3, 10], log_p2[4, 11], log_p2[5, 12]]
    by_hand = -torch.stack(terms).sum() / 7
    by_hand.backward()
    assert abs(loss - by_hand.item()) < 1e-5
    assert torch.allclose(step_grad, model.lm_head.weight.grad, atol=1e-6)
    mean_of_means = -(torch.stack(terms[:3]).mean() + torch.stack(terms[3:]).mean()) / 2
    assert abs(mean_of_means.item() - loss) > 1e-4  # what normalising per micro-step would have given


class Killed(Exception):
    pass


LORA_RUN = [
    *SCRATCH,
    "--rank",
    "4",
    "--targets",
    "q,v,mlp",
    "--lora-dropout",
    "0.1",
    *TINY_RUN,
    "--eval-interval",
    "20",
]


def assert_same_run(a: str, b: str) -> None:
    """Two run folders hold the same adapter, bit for bit, and logged the same losses."""
    losses = [[(r["step"], r.get("train_loss"), r["val_loss"]) for r in read_log(out)] for out in (a, b)]
    assert losses[0] == losses[1]
    adapters = [load_file(os.path.join(out, "adapter.safetensors")) for out in (a, b)]
    assert adapters[0].keys() == adapters[1].keys()
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("how", ["killed after a checkpoint", "max-iters extended"])
def test_a_resumed_run_ends_bit_for_bit_where_a_straight_run_ends(tmp_path, char_data, monkeypatch, dtype, how):
    """LoRA dropout on, so every mask after the resume must come from the restored random state; in bf16 too,
    where attention is written out (a run must make the choices its straight twin made)."""
    # the warmup spans the run: after it the schedule depends on --max-iters, which extending it changes
    run = [*LORA_RUN, "--warmup-iters", "40", "--dtype", dtype, "--data", char_data]
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    train.main([*run, "--max-iters", "40", "--run-dir", straight])
    if how == "killed after a checkpoint":

        def die_while_writing_the_adapter(model, path):
            raise Killed  # killed at step 20, after train_state.pt and before the adapter beside it

        monkeypatch.setattr(train, "save_adapter", die_while_writing_the_adapter)
        with pytest.raises(Killed):
            train.main([*run, "--max-iters", "40", "--run-dir", resumed])
        assert sorted(os.listdir(resumed)) == ["log.jsonl", "train_state.pt"]  # the checkpoint is the state alone
        monkeypatch.undo()
    else:
        train.main([*run, "--max-iters", "20", "--run-dir", resumed])
    train.main([*run, "--max-iters", "40", "--run-dir", resumed, "--resume"])
    assert [r["step"] for r in read_log(resumed)] == [0, 20, 40]
    assert_same_run(straight, resumed)


def test_two_runs_of_one_command_are_equal_while_the_cpu_is_busy(tmp_path, char_data):
    """The machine's load never changes a result: a run beside processes that keep every core busy ends
    where the same command ends on an idle machine (bf16, where choices of kernel change the numbers)."""
    run = [*LORA_RUN, "--dtype", "bfloat16", "--data", char_data, "--max-iters", "20"]
    train.main([*run, "--run-dir", str(tmp_path / "idle")])
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]
    try:
        train.main([*run, "--run-dir", str(tmp_path / "busy")])
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
    assert_same_run(str(tmp_path / "idle"), str(tmp_path / "busy"))


def test_evaluating_more_often_changes_no_weight(tmp_path, char_data):
    """An evaluation draws no random number and moves no batch: a run evaluated every 2 steps (LoRA dropout on)
    ends with the adapter of one evaluated at its end alone, and logs the same final loss (lab.miniature's
    further seeds log no curve)."""
    run = [*LORA_RUN, "--data", char_data, "--max-iters", "8"]
    train.main([*run, "--eval-interval", "2", "--run-dir", str(tmp_path / "often")])
    train.main([*run, "--eval-interval", "8", "--run-dir", str(tmp_path / "once")])
    often, once = read_log(str(tmp_path / "often")), read_log(str(tmp_path / "once"))
    assert [r["step"] for r in often] == [0, 2, 4, 6, 8] and [r["step"] for r in once] == [0, 8]
    assert often[-1]["val_loss"] == once[-1]["val_loss"] and often[-1]["train_loss"] == once[-1]["train_loss"]
    adapters = [load_file(str(tmp_path / out / "adapter.safetensors")) for out in ("often", "once")]
    assert all(torch.equal(adapters[0][k], adapters[1][k]) for k in adapters[0])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ddp_on_two_cpu_processes_keeps_identical_adapters(tmp_path, char_data, dtype):
    out = str(tmp_path / "out")
    worker = tmp_path / "worker.py"  # train.py, then each process writes the LoRA weights it holds
    worker.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import train\nfrom lora import lora_state_dict\nfrom safetensors.torch import save_file\n"
        "model = train.main(sys.argv[1:])\n"
        f"save_file(lora_state_dict(model), os.path.join({out!r}, 'rank' + os.environ['RANK'] + '.safetensors'))\n"
    )
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        str(worker),
        *SCRATCH,
        "--rank",
        "4",
        *TINY_RUN,
        "--data",
        char_data,
        "--run-dir",
        out,
        "--max-iters",
        "4",
        "--eval-interval",
        "4",
        "--dtype",
        dtype,  # pinned: a subprocess sees the real CPU, whatever conftest fakes
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # two processes on a small CI machine
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (load_file(os.path.join(out, f"rank{r}.safetensors")) for r in (0, 1))
    saved = load_file(os.path.join(out, "adapter.safetensors"))
    assert set(rank0) == set(rank1) == set(saved)
    assert all(torch.equal(rank0[k], rank1[k]) and torch.equal(rank0[k], saved[k]) for k in saved)
    assert all(saved[k].abs().sum() > 0 for k in saved if ".lora_B." in k)


def bad_data(folder, case: str) -> str:
    """A copy of the char data folder with one file broken the way `case` says."""
    path = folder / case
    shutil.copytree(folder / "chars", path)
    if case == "odd-size":
        with open(path / "train.bin", "ab") as f:
            f.write(b"x")
    elif case == "meta-not-json":
        (path / "meta.json").write_text("{vocab_size: 128")
    elif case == "meta-without-key":
        (path / "meta.json").write_text(json.dumps({"vocab_size": 128}))
    elif case == "mask-length":
        (path / "train_mask.bin").write_bytes(b"\x01" * 10)
    elif case == "ids-beyond-vocab":
        tokens = np.fromfile(path / "val.bin", dtype=np.uint16)
        tokens[5] = 500
        tokens.tofile(path / "val.bin")
    return str(path)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--data", "{tmp}/missing"], "is not a data folder (no meta.json)"),
        (["--data", "{tmp}"], "is not a data folder"),
        (["--data", "{data}/odd-size"], "train.bin has an odd number of bytes"),
        (["--data", "{data}/meta-not-json"], "meta.json is not JSON"),
        (["--data", "{data}/meta-without-key"], "meta.json has no 'eot_token'"),
        (["--data", "{data}/mask-length"], "train_mask.bin has 10 entries for the 18000 tokens"),
        (["--data", "{data}/ids-beyond-vocab"], "val.bin holds token id 500, beyond the model's vocabulary of 128"),
        (["--targets", "q,query"], "query"),
        (["--base", "gpt3"], "unknown model 'gpt3'"),
        (["--base", "{tmp}"], "is not a GPT-2 checkpoint folder"),
    ],
)
def test_bad_input_is_one_line_and_overwrites_nothing(tmp_path, char_data, args, message):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "empty").mkdir()
    (out / "adapter.safetensors").write_bytes(b"an earlier adapter")
    (out / "log.jsonl").write_text("an earlier log\n")
    data = tmp_path / "data"
    data.mkdir()
    shutil.copytree(char_data, data / "chars")
    for arg in args:
        if arg.startswith("{data}/"):
            bad_data(data, arg.removeprefix("{data}/"))
    # --overwrite: even the run it would replace stays whole until every input has been checked
    argv = ["--base", "scratch", "--data", char_data, *TINY_RUN, "--run-dir", str(out), "--overwrite"]
    with pytest.raises(SystemExit) as exit:
        train.main(argv + [a.format(tmp=tmp_path / "empty", data=data) for a in args])
    assert str(exit.value).startswith("train.py: error: ") and message in str(exit.value), exit.value
    assert "\n" not in str(exit.value)
    assert sorted(os.listdir(out)) == ["adapter.safetensors", "log.jsonl"]
    assert (out / "adapter.safetensors").read_bytes() == b"an earlier adapter"
    assert (out / "log.jsonl").read_text() == "an earlier log\n"


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path, char_data, capsys):
    out = str(tmp_path / "out")
    lora_run = [*SCRATCH, "--rank", "4", *TINY_RUN, "--data", char_data, "--max-iters", "2", "--run-dir", out]
    train.main(lora_run)
    before = {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)}
    full_run = [*SCRATCH, "--rank", "0", *TINY_RUN, "--data", char_data, "--max-iters", "2", "--run-dir", out]
    with pytest.raises(SystemExit, match="holds another run .* --resume continues it, --overwrite replaces it"):
        train.main(full_run)
    assert {name: open(os.path.join(out, name), "rb").read() for name in os.listdir(out)} == before
    train.main([*full_run, "--overwrite"])  # replaced whole: no adapter of the old run beside the new model
    assert sorted(os.listdir(out)) == ["config.json", "log.jsonl", "model.safetensors", "train_state.pt"]
    assert [r["step"] for r in read_log(out)] == [0, 2]
    with pytest.raises(SystemExit, match="was written by a run with"):
        train.main([*lora_run, "--resume"])  # another run's settings
    for argv, message in (
        ([*full_run, "--resume", "--overwrite"], "choose one"),
        ([*full_run, "--targets", "q"], "--targets configure LoRA, but --rank 0"),
        ([*full_run, "--rank", "-1"], "--rank must be >= 0"),
        ([*full_run, "--epochs", "2"], "--epochs counts passes over whole examples"),
    ):
        with pytest.raises(SystemExit):
            train.main(argv)
        assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "train_state.pt is empty"),
        (b"PK\x03\x04 not really a zip", "is truncated or corrupt"),
        ("truncate", "is truncated or corrupt"),
        ("one byte", "is truncated or corrupt"),  # was misread as a pickle of Python objects
        ("code", "holds Python objects, not only tensors: it is not a state written by train.py"),
    ],
)
def test_a_broken_train_state_is_refused_in_one_line(tmp_path, char_data, content, message):
    out = tmp_path / "out"
    run = [*SCRATCH, "--rank", "4", *TINY_RUN, "--data", char_data, "--max-iters", "2", "--run-dir", str(out)]
    train.main(run)
    state = out / "train_state.pt"
    if content in ("truncate", "one byte"):
        state.write_bytes(state.read_bytes()[: 1000 if content == "truncate" else 1])
    elif content == "code":
        torch.save({"step": 2, "settings": Killed()}, state)  # an object, unpickled only by running code
    else:
        state.write_bytes(content)
    before = state.read_bytes()
    with pytest.raises(SystemExit) as exit:
        train.main([*run, "--resume"])
    assert str(exit.value).startswith("train.py: error: ") and message in str(exit.value), exit.value
    assert "weights_only" not in str(exit.value) and "\n" not in str(exit.value)
    assert state.read_bytes() == before


def test_resume_reads_the_stored_lora_settings_as_a_lora_config(tmp_path, char_data):
    """A field added to LoRAConfig with a default must not refuse the runs written before it; a stored
    setting this lora.py does not know is one line."""
    out = tmp_path / "out"
    run = [*SCRATCH, "--rank", "4", *TINY_RUN, "--data", char_data, "--eval-interval", "2", "--run-dir", str(out)]
    train.main([*run, "--max-iters", "2"])
    state = torch.load(out / "train_state.pt", weights_only=True)
    del state["settings"]["lora"]["dropout"]  # as a lora.py from before LoRAConfig had dropout wrote it
    torch.save(state, out / "train_state.pt")
    train.main([*run, "--max-iters", "4", "--resume"])
    assert [r["step"] for r in read_log(out)] == [0, 2, 4]
    state = torch.load(out / "train_state.pt", weights_only=True)
    state["settings"]["lora"]["use_rslora"] = True  # from a lora.py with a field this one lacks
    torch.save(state, out / "train_state.pt")
    with pytest.raises(SystemExit) as exit:
        train.main([*run, "--max-iters", "6", "--resume"])
    message = str(exit.value)
    assert message.startswith("train.py: error: ") and "\n" not in message and "use_rslora" in message
    assert "train_state.pt has LoRA settings this lora.py cannot read" in message


def test_pairs_too_long_for_the_block_size_are_refused_not_a_zero_loss(tmp_path):
    first, second = [1, 2, 3, 4, 5, 6, 100], [7, 8, 4, 9, 10, 11, 12, 100]  # contexts of 4 and 3 tokens
    tokens = np.array(first + second + first, dtype=np.uint16)
    mask = np.array([0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1, 1] + [0, 0, 0, 0, 1, 1, 1], dtype=np.uint8)
    folder = str(tmp_path / "pairs")
    prepare_data.write_folder(folder, {"train.bin": tokens, "train_mask.bin": mask}, {})
    with pytest.raises(
        ValueError, match="no window of --block-size 2 .* the shortest context is 3 tokens; use --block-size 8 or more"
    ):
        prepare_data.load_split(folder, "train", block_size=2, eot_token=100)
    assert prepare_data.load_split(folder, "train", block_size=3, eot_token=100).starts.tolist() == [7]  # the short one


def test_ctrl_c_says_where_the_last_checkpoint_is_and_exits_130(tmp_path, char_data, monkeypatch, capsys):
    out = str(tmp_path / "out")
    run = [*SCRATCH, "--rank", "4", *TINY_RUN, "--data", char_data, "--max-iters", "6", "--eval-interval", "2"]
    forward_backward, calls = train.forward_backward, []

    def interrupted_at_the_fourth_step(*args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return forward_backward(*args)

    monkeypatch.setattr(train, "forward_backward", interrupted_at_the_fourth_step)
    with pytest.raises(SystemExit) as exit:
        train.main([*run, "--run-dir", out])
    assert exit.value.code == 130
    assert f"train.py: interrupted at step 3; the last checkpoint is step 2 in {out}: --resume continues" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(train, "forward_backward", forward_backward)
    train.main([*run, "--run-dir", out, "--resume"])
    assert [r["step"] for r in read_log(out)] == [0, 2, 4, 6]


def pairs_folder(tmp_path) -> str:
    """Three examples (context, separator 4, target, end-of-text 100) in train and val."""
    first, second, third = [1, 2, 3, 4, 5, 6, 100], [7, 8, 4, 9, 10, 11, 12, 100], [13, 4, 14, 100]
    tokens = np.array(first + second + third, dtype=np.uint16)
    mask = np.array([0, 0, 0, 0, 1, 1, 1] + [0, 0, 0, 1, 1, 1, 1, 1] + [0, 0, 1, 1], dtype=np.uint8)
    folder = str(tmp_path / "pairs")
    arrays = {"train.bin": tokens, "train_mask.bin": mask, "val.bin": tokens, "val_mask.bin": mask}
    prepare_data.write_folder(folder, arrays, {"vocab_size": 101, "eot_token": 100})
    return folder


def test_padded_batches_hold_one_whole_example_per_row_with_loss_on_its_target(tmp_path):
    folder = pairs_folder(tmp_path)
    with pytest.raises(ValueError, match="has an example of 8 tokens: use --block-size 7 or more"):
        prepare_data.load_split(folder, "train", block_size=6, eot_token=100, padded=True)
    split = prepare_data.load_split(folder, "train", block_size=7, eot_token=100, padded=True)
    x, y = train.padded_batch(split, [2, 1], "cpu")
    assert x.tolist() == [[13, 4, 14, 0, 0, 0, 0], [7, 8, 4, 9, 10, 11, 12]]
    assert y.tolist() == [[-1, 14, 100, -1, -1, -1, -1], [-1, -1, 9, 10, 11, 12, 100]]
    # each epoch is a new shuffle of every example, and position alone decides what is drawn
    orders = [train.epoch_order(3, first, 3, seed=1) for first in (0, 3, 6)]
    assert all(sorted(order) == [0, 1, 2] for order in orders) and len({tuple(o) for o in orders}) > 1
    assert train.epoch_order(3, 2, 4, seed=1) == orders[0][2:] + orders[1][:3]
    plain = str(tmp_path / "plain")
    prepare_data.write_folder(plain, {"train.bin": np.arange(50, dtype=np.uint16)}, {})
    with pytest.raises(ValueError, match="holds plain text: --batching padded needs pairs"):
        prepare_data.load_split(plain, "train", block_size=7, eot_token=100, padded=True)


def test_the_papers_e2e_recipe_runs_by_epochs_with_a_linear_schedule_and_label_smoothing(tmp_path):
    run = str(tmp_path / "run")
    argv = [
        *SCRATCH,
        "--rank",
        "4",
        "--alpha",
        "32",
        "--lora-dropout",
        "0.1",
        "--data",
        pairs_folder(tmp_path),
        "--batching",
        "padded",
        "--epochs",
        "3",
        "--batch-size",
        "2",
        "--grad-accum",
        "1",
        "--block-size",
        "8",
        "--schedule",
        "linear",
        "--warmup-iters",
        "2",
        "--label-smoothing",
        "0.1",
        "--lr",
        "1e-2",
        "--eval-interval",
        "5",
        "--device",
        "cpu",
        "--run-dir",
        run,
    ]
    train.main(argv)
    log = read_log(run)
    assert [r["step"] for r in log] == [0, 5]  # 3 epochs of 3 examples at 2 a step: ceil(9 / 2) = 5 steps
    assert log[-1]["lr"] == pytest.approx(1e-2 * (1 - 2 / 3))  # step 4 of 5: linear decay to 0 after warmup
    args = train.parse_args(argv)
    args.max_iters = 5
    assert [train.learning_rate(s, args) for s in (0, 1, 2, 5)] == pytest.approx([5e-3, 1e-2, 1e-2, 0.0])


def test_a_bf16_base_lora_run_follows_the_fp32_run_and_their_adapters_swap(tmp_path, char_data, capsys):
    """--dtype bfloat16 stores LoRA's frozen base in bf16 (A, B and AdamW's state stay fp32): its loss curve
    is the fp32 run's within bf16 noise, and each run's adapter loads onto the other's base."""
    base = str(tmp_path / "base")
    pretrain = [*SCRATCH, "--rank", "0", "--lr", "3e-3", *TINY_RUN, "--max-iters", "40"]
    train.main([*pretrain, "--data", char_data, "--run-dir", base])
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runs[dtype] = str(tmp_path / dtype)
        lora_run = ["--base", base, *"--rank 8 --targets q,k,v,o,mlp --lr 1e-2 --max-iters 40".split(), *TINY_RUN]
        model = train.main(
            [*lora_run, "--eval-interval", "10", "--dtype", dtype, "--data", char_data, "--run-dir", runs[dtype]]
        )
        said = {"float32": "precision: autocast float32\n", "bfloat16": "autocast bfloat16, frozen base in bfloat16\n"}
        assert said[dtype] in capsys.readouterr().out
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
        trained = {p.dtype for p in model.parameters() if p.requires_grad}
        assert (frozen, trained) == ({getattr(torch, dtype)}, {torch.float32})
        state = torch.load(os.path.join(runs[dtype], "train_state.pt"), weights_only=True)
        assert {t.dtype for s in state["optimizer"]["state"].values() for t in s.values() if t.dim()} == {torch.float32}
    for metric in ("train_loss", "val_loss"):  # the same batches in both runs: only the precision differs
        curves = {dtype: [r.get(metric, np.nan) for r in read_log(run)] for dtype, run in runs.items()}
        assert np.allclose(curves["bfloat16"], curves["float32"], atol=0.02, equal_nan=True), curves
    assert curves["float32"][-1] < curves["float32"][0] - 0.03  # val loss: the adapters learned

    tokens = np.fromfile(os.path.join(char_data, "val.bin"), dtype=np.uint16)[:1025].astype(np.int64)
    x, y = torch.from_numpy(tokens[:-1]).view(32, 32), torch.from_numpy(tokens[1:]).view(32, 32)
    losses = {}
    for adapter_of, base_dtype in (("bfloat16", torch.float32), ("float32", torch.bfloat16)):
        model = GPT.from_pretrained(base)
        config = load_adapter(model, os.path.join(runs[adapter_of], "adapter.safetensors"))  # injects LoRA
        assert config.rank == 8
        train.freeze_base_in(model, base_dtype)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=base_dtype == torch.bfloat16):
            losses[adapter_of] = model.eval()(x, y)[1].item()
    assert abs(losses["bfloat16"] - losses["float32"]) < 0.01, losses


def test_activation_checkpointing_trains_the_same_adapter(tmp_path, char_data, base_folder):
    """--activation-checkpointing only trades memory for compute: the same losses and the same adapter."""
    run = ["--base", base_folder, "--rank", "4", "--lora-dropout", "0.1", *TINY_RUN, "--max-iters", "4"]
    outs = {False: str(tmp_path / "plain"), True: str(tmp_path / "checkpointed")}
    for checkpointing, out in outs.items():
        flags = ["--activation-checkpointing"] if checkpointing else []
        model = train.main([*run, *flags, "--data", char_data, "--run-dir", out])
        assert model.activation_checkpointing is checkpointing
    logs = [read_log(out) for out in outs.values()]
    assert [r.get("train_loss") for r in logs[0]] == pytest.approx([r.get("train_loss") for r in logs[1]], abs=1e-6)
    adapters = [load_file(os.path.join(out, "adapter.safetensors")) for out in outs.values()]
    assert all(torch.allclose(adapters[0][k], adapters[1][k], atol=1e-6) for k in adapters[0])
