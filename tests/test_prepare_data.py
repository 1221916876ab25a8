import base64
import json
import os
import urllib.request

import numpy as np
import pytest
import tiktoken

import prepare_data
import sample
import train
from conftest import ROOT
from model import GPT, GPTConfig

SHARED = os.path.join(os.path.dirname(ROOT), "shared")


@pytest.fixture(scope="module")
def encoding():
    """tiktoken's gpt2 BPE, offline from ../shared/tiktoken (or TIKTOKEN_CACHE_DIR)."""
    cache = os.path.join(SHARED, "tiktoken")
    if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(cache):
        os.environ["TIKTOKEN_CACHE_DIR"] = cache
    try:
        return prepare_data.load_encoding()
    except OSError as e:
        pytest.skip(str(e))


def read(folder, name, dtype):
    return np.fromfile(os.path.join(folder, name), dtype=dtype)


def test_text_round_trips_and_splits_at_the_end(tmp_path, encoding):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20
    source = tmp_path / "play.txt"
    source.write_text(text)
    folder = prepare_data.main(["--input", str(source), "--out-dir", str(tmp_path / "data"), "--val-fraction", "0.25"])
    assert folder == str(tmp_path / "data" / "play")
    train, val = read(folder, "train.bin", np.uint16), read(folder, "val.bin", np.uint16)
    assert encoding.decode(np.concatenate([train, val]).tolist()) == text
    assert len(val) == int(0.25 * (len(train) + len(val)))
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert (meta["format"], meta["tokenizer"]) == ("text", "gpt2")
    assert (meta["train_tokens"], meta["val_tokens"]) == (len(train), len(val))
    assert sorted(os.listdir(tmp_path / "data")) == ["play"]  # no temporary folder left behind


def test_end_of_text_between_documents_is_gpt2s_token(tmp_path, encoding):
    source = tmp_path / "docs.txt"
    source.write_text("The first document.<|endoftext|>The second\nof two lines.<|endoftext|>")
    folder = prepare_data.main(["--input", str(source), "--out-dir", str(tmp_path), "--val-fraction", "0.1"])
    tokens = np.concatenate([read(folder, "train.bin", np.uint16), read(folder, "val.bin", np.uint16)]).tolist()
    assert [i for i, t in enumerate(tokens) if t == 50256] == [4, len(tokens) - 1]  # one token each, where it was
    assert encoding.decode(tokens) == source.read_text()


def test_pairs_mask_covers_target_and_end_of_text_only(tmp_path, encoding):
    lines = ["name : Aromi | area : riverside||Aromi is by the river . ", "name : Zizzi||Zizzi serves food ."] * 3
    source = tmp_path / "e2e.txt"
    source.write_text("\n".join(lines) + "\n\n")
    folder = prepare_data.main(
        ["--format", "pairs", "--input", str(source), "--name", "e2e", "--out-dir", str(tmp_path)]
    )
    tokens, mask = read(folder, "train.bin", np.uint16), read(folder, "train_mask.bin", np.uint8)
    assert len(tokens) == len(mask)
    examples = np.split(np.arange(len(tokens)), np.flatnonzero(tokens == encoding.eot_token)[:-1] + 1)
    assert len(examples) == 5  # 6 pairs, the last held out for validation
    first = examples[0]
    example = "name : Aromi | area : riverside || Aromi is by the river .<|endoftext|>"
    assert encoding.decode(tokens[first].tolist()) == example
    assert encoding.decode(tokens[first][mask[first] == 1].tolist()) == " Aromi is by the river .<|endoftext|>"
    assert mask[first][0] == 0 and mask[first][-1] == 1
    val_sizes = read(folder, "val.bin", np.uint16).size, read(folder, "val_mask.bin", np.uint8).size
    assert val_sizes == 2 * (len(examples[1]),)  # the held-out pair is the second kind

    # the same pairs as JSONL give the same files
    jsonl = tmp_path / "e2e.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"context": c, "completion": t}) for c, t in (line.split("||") for line in lines))
    )
    again = prepare_data.main(
        ["--format", "pairs", "--input", str(jsonl), "--name", "e2e-jsonl", "--out-dir", str(tmp_path)]
    )
    for name, dtype in (("train.bin", np.uint16), ("train_mask.bin", np.uint8), ("val.bin", np.uint16)):
        assert np.array_equal(read(folder, name, dtype), read(again, name, dtype)), name


@pytest.mark.parametrize(
    "file_name, content, fmt, message",
    [
        (None, None, "text", "no such file"),
        ("empty.txt", "  \n", "text", "is empty"),
        ("pairs.txt", "a||b\nno separator here\n", "pairs", "line 2: no '||'"),
        ("pairs.jsonl", '{"context": "a", "completion": "b"}\n{"context": 1}\n', "pairs", "line 2: not a JSON"),
    ],
)
def test_bad_input_is_one_line_and_leaves_the_old_folder(tmp_path, encoding, capsys, file_name, content, fmt, message):
    out = tmp_path / "data"
    (out / "mine").mkdir(parents=True)
    (out / "mine" / "train.bin").write_bytes(b"old")
    source = tmp_path / (file_name or "missing.txt")
    if content is not None:
        source.write_text(content)
    with pytest.raises(SystemExit) as exit:
        prepare_data.main(["--input", str(source), "--format", fmt, "--name", "mine", "--out-dir", str(out)])
    assert str(exit.value).startswith("prepare_data.py: error: ") and message in str(exit.value)
    assert "\n" not in str(exit.value)
    assert os.listdir(out) == ["mine"] and (out / "mine" / "train.bin").read_bytes() == b"old"


def test_failed_download_says_to_use_input(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(SystemExit) as exit:
        prepare_data.main(["--out-dir", str(tmp_path)])
    assert "could not download tiny Shakespeare" in str(exit.value) and "--input" in str(exit.value)
    assert os.listdir(tmp_path) == []


def test_e2e_is_downloaded_as_the_authors_three_splits(tmp_path, encoding, monkeypatch):
    files = {
        "train": "name : A | food : Thai||A serves Thai food.\n",
        "valid": "name : B||B is a pub.\n",
        "test": "name : C||C is here.\nname : C||There is C.\n",
    }
    fetched = []

    def fake_download(url: str, what: str) -> str:
        fetched.append(url)
        return files[url.rsplit("/", 1)[1].removesuffix(".txt")]

    monkeypatch.setattr(prepare_data, "download", fake_download)
    folder = prepare_data.main(["--e2e", "--out-dir", str(tmp_path / "data")])
    assert fetched == [prepare_data.E2E_URL.format(split=s) for s in ("train", "valid", "test")]
    assert folder == str(tmp_path / "data" / "e2e")
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert (meta["train_examples"], meta["val_examples"]) == (1, 1)  # valid.txt is the validation split
    assert encoding.decode(read(folder, "val.bin", np.uint16).tolist()) == "name : B || B is a pub.<|endoftext|>"
    assert open(os.path.join(folder, "test.txt")).read() == files["test"]  # kept for python -m lab.e2e


def test_val_input_replaces_the_held_out_share(tmp_path, encoding):
    (tmp_path / "train.txt").write_text("a||b\nc||d\n")
    (tmp_path / "val.txt").write_text("e||f\n")
    folder = prepare_data.main(
        [
            "--format",
            "pairs",
            "--input",
            str(tmp_path / "train.txt"),
            "--val-input",
            str(tmp_path / "val.txt"),
            "--out-dir",
            str(tmp_path / "data"),
        ]
    )
    meta = json.load(open(os.path.join(folder, "meta.json")))
    assert (meta["train_examples"], meta["val_examples"], meta["val_source"]) == (2, 1, str(tmp_path / "val.txt"))


TEXTS = [
    "First Citizen:\nBefore we proceed any further, hear me speak.<|endoftext|>All:\nSpeak, speak.\n",
    "name : X-name | eatType : coffee shop | food : Japanese",
    " ||",
    " X-name is a Japanese coffee shop in the riverside area near X-near.",
]


def test_a_trimmed_bpe_splits_its_texts_as_gpt2_does_and_still_encodes_any_other(encoding):
    trimmed = prepare_data.trimmed_encoding(prepare_data.trim_encoding(TEXTS))
    tricky = "It's 2024 -- they'll say:  'no'   \n\n  x\t\ty  123456 wow!!!   "
    same_rules = tiktoken.Encoding(
        "r", pat_str=prepare_data.GPT2_PATTERN, mergeable_ranks=encoding._mergeable_ranks, special_tokens={}
    )
    assert same_rules.encode(tricky) == encoding.encode(tricky)  # GPT-2's pre-tokenisation, copied once
    for text in TEXTS:  # the same tokens, renumbered
        tokens = trimmed.encode(text, allowed_special={prepare_data.END_OF_TEXT})
        gpt2 = encoding.encode(text, allowed_special={prepare_data.END_OF_TEXT})
        assert [trimmed.decode_single_token_bytes(t) for t in tokens] == [
            encoding.decode_single_token_bytes(t) for t in gpt2
        ]
    used = set().union(*(encoding.encode(t, allowed_special={prepare_data.END_OF_TEXT}) for t in TEXTS))
    assert len(used) < trimmed.n_vocab < 256 + 3 * len(used)  # the bytes, the tokens, the pieces BPE builds them from
    assert trimmed.eot_token == trimmed.n_vocab - 1
    other = "Zebras quizzically juxtapose Björk's naïve façade"
    assert trimmed.decode(trimmed.encode(other)) == other  # smaller pieces, down to bytes
    assert len(trimmed.encode(other)) > len(encoding.encode(other))


def test_without_the_pieces_bpe_forms_on_the_way_a_word_splits_otherwise(encoding):
    ranks, word = encoding._mergeable_ranks, " Zizzi"  # a word of several tokens: BPE merges from its bytes
    gpt2 = [encoding.decode_single_token_bytes(t) for t in encoding.encode(word)]
    assert len(gpt2) > 1

    def bpe(kept: set[bytes]) -> list[bytes]:
        kept = kept | {bytes([b]) for b in range(256)}
        lines = [f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(sorted(kept, key=ranks.get))]
        trimmed = prepare_data.trimmed_encoding("".join(lines))
        return [trimmed.decode_single_token_bytes(t) for t in trimmed.encode(word)]

    assert bpe(set(gpt2)) != gpt2  # its tokens alone: BPE cannot reach them
    assert bpe(set().union(*(prepare_data.pieces(t, ranks) for t in gpt2))) == gpt2  # with the pieces: GPT-2's split


def test_a_folder_prepared_with_a_trimmed_bpe_keeps_it_and_models_read_it(tmp_path, encoding):
    tokenizer = prepare_data.trim_encoding(TEXTS)
    source = tmp_path / "text.txt"
    source.write_text(TEXTS[0] * 30)
    folder = prepare_data.prepare(str(source), "trimmed", out_dir=str(tmp_path), tokenizer=tokenizer)
    meta = json.load(open(os.path.join(folder, "meta.json")))
    trimmed = prepare_data.load_encoding(folder)
    assert (meta["tokenizer"], meta["vocab_size"], meta["eot_token"]) == (
        "gpt2-trimmed",
        trimmed.n_vocab,
        trimmed.eot_token,
    )
    tokens = np.concatenate([read(folder, "train.bin", np.uint16), read(folder, "val.bin", np.uint16)]).tolist()
    assert trimmed.decode(tokens) == TEXTS[0] * 30
    assert max(tokens) < trimmed.n_vocab

    model = GPT(GPTConfig(block_size=16, vocab_size=trimmed.n_vocab, n_layer=1, n_head=1, n_embd=8))
    model.save_pretrained(str(tmp_path / "bare"))
    with pytest.raises(ValueError, match=rf"smaller than its BPE's \(50257: gpt2\); .* \({prepare_data.TOKENIZER}\)"):
        sample.model_encoding(GPT.from_pretrained(str(tmp_path / "bare")))  # GPT-2's 50,257 do not fit
    tiny = ["--n-layer", "1", "--n-head", "1", "--n-embd", "8", "--block-size", "16", "--batch-size", "2"]
    run = ["--base", "scratch", "--rank", "0", *tiny, "--max-iters", "1", "--eval-iters", "1", "--device", "cpu"]
    train.main([*run, "--dtype", "float32", "--data", folder, "--run-dir", str(tmp_path / "base")])
    _, prompts = sample.encode_prompts(GPT.from_pretrained(str(tmp_path / "base")), ["First Citizen:"])
    assert prompts == [trimmed.encode("First Citizen:")]  # the run's folder keeps its data's BPE
