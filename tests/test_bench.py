"""bench.py and lab.bench_mixed end to end on a tiny model: every table, every row, every number positive and finite."""

import json
import math

import pytest
import torch

import bench
from conftest import TINY
from lab import bench_mixed, profile_step
from model import GPT
from utils import describe_dtype, resolve_dtype

METRICS = {"inference": {"latency"}, "decoding": {"tokens/s"}, "training": set(bench.UNITS)}


@pytest.fixture
def one_thread(monkeypatch):
    """One thread here and in the spawned children: on a shared 2-core machine, tiny ops on two
    spinning threads wait on each other far longer than they compute."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_bench_writes_every_row(tmp_path, one_thread, capsys):
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    argv = [
        "--size",
        str(tmp_path / "tiny"),
        "--device",
        "cpu",
        "--shapes",
        "1x8,2x16",
        "--train-shape",
        "2x8",
        "--trials",
        "2",
        "--warmup",
        "1",
        "--decode-tokens",
        "8",
        "--out",
        str(out),
    ]
    returned = bench.main(argv)

    rows = json.loads((out / "results.json").read_text())["rows"]
    assert rows == json.loads(json.dumps(returned))
    whats = {t: {r["what"] for r in rows if r["table"] == t} for t in METRICS}
    assert whats["inference"] == {bench.BASE, "LoRA merged", "LoRA unmerged", "Adapter^H", "Adapter^L"}
    assert whats["training"] == {run.what for run in bench.training_runs(peers=False)}
    assert whats["decoding"] == {bench.OURS, "floor: its matrix-vector products"}
    for table, metrics in METRICS.items():
        shapes = {"inference": ["1x8", "2x16"], "decoding": ["1x16+8"], "training": ["2x8"]}[table]
        # one row per model, metric and shape: nothing missing, nothing twice
        keys = sorted((r["what"], r["metric"], r["shape"]) for r in rows if r["table"] == table)
        assert keys == sorted((w, m, s) for w in whats[table] for m in metrics for s in shapes)
    for r in rows:
        assert {"what", "model", "shape", "device", "dtype", "median", "min", "max", "ratio"} <= set(r)
        numbers = [v for v in r.values() if isinstance(v, (int, float))]
        assert all(math.isfinite(v) and v > 0 for v in numbers), r
        assert r["min"] <= r["median"] <= r["max"]
        if r["what"] == r["reference"]:
            assert r["ratio"] == 1.0

    by_key = {(r["what"], r["metric"]): r["median"] for r in rows if r["table"] == "training"}
    # the adapter file holds A and B only; the full checkpoint holds every weight
    assert by_key["LoRA r=4 q,v", "checkpoint"] < by_key[bench.FULL, "checkpoint"]
    assert by_key["LoRA r=4 q,v", "trainable params"] == 2 * TINY.n_layer * 2 * 4 * TINY.n_embd
    n_params = GPT(TINY).num_parameters()
    assert by_key[bench.FULL, "trainable params"] == n_params
    assert by_key[bench.FULL, "optimizer state"] >= 2 * 4 * n_params  # AdamW: two fp32 moments a weight
    for what in whats["training"]:  # model FLOPs: 6·N a token fully fine-tuned, 4·N with LoRA (N: every weight)
        lora = what != bench.FULL
        n = n_params + lora * by_key[what, "trainable params"]
        assert by_key[what, "model FLOP/s"] == pytest.approx((4 if lora else 6) * n * by_key[what, "tokens/s"])
        peak = next(r["matmul_peak"] for r in rows if r["what"] == what)
        assert by_key[what, "of matmul peak"] == pytest.approx(100 * by_key[what, "model FLOP/s"] / peak)
    # tensors at the peak: full fine-tuning holds fp32 weights, their gradients and two AdamW moments
    assert by_key[bench.FULL, "peak memory"] >= 16 * n_params
    assert 4 * n_params <= by_key["LoRA r=4 q,v", "peak memory"] < by_key[bench.FULL, "peak memory"]
    printed = capsys.readouterr().out
    assert "| Adapter^H |" in printed and "| LoRA r=4 q,v |" in printed
    assert (out / "bench.png").stat().st_size > 0


def test_decoding_against_transformers_and_compiled(tmp_path, one_thread, capsys):
    """The same greedy tokens from ours, ours compiled and transformers' on the same weights; the floor does
    less than any of them."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(tmp_path / "tiny"))
    args = bench.parse_args(
        ["--size", str(tmp_path / "tiny"), "--device", "cpu", "--dtype", "float32", "--peers", "--compile"]
        + ["--trials", "1", "--warmup", "0", "--decode-tokens", "8"]
    )
    model = bench.build_model(args.size, "cpu").eval()
    x = torch.randint(TINY.vocab_size, (1, bench.DECODE_PROMPT))
    ours = model.generate(x, 8, temperature=0)
    assert torch.equal(bench.hf_decoder(model, torch.float32)(x, 8), ours)
    rows = {r["what"]: r for r in bench.add_ratios(bench.decoding_rows(args))}
    assert set(rows) == {bench.OURS, bench.COMPILED, "transformers (generate)", "floor: its matrix-vector products"}
    assert rows[bench.COMPILED]["compile_s"] > 0 and rows[bench.OURS]["ratio"] == 1.0
    assert rows["floor: its matrix-vector products"]["ratio"] > 1  # a subset of the work
    assert "s to compile) |" in bench.decoding_table(list(rows.values()))


def test_peak_tensor_bytes_adds_the_alive_to_the_steps_peak():
    alive = torch.zeros(1_000_000)  # 4 MB

    def step():
        big = torch.ones(5_000_000)  # 20 MB, freed before the next
        del big
        return torch.ones(2_500_000)  # 10 MB

    peak = bench.peak_tensor_bytes(step, [alive, alive[:10]], "cpu")  # a view shares its storage: counted once
    assert 24e6 <= peak < 24.01e6


@pytest.mark.parametrize(
    "argv",
    [
        ["--shapes", "4by256"],
        ["--size", "gpt-5"],
        ["--dtype", "float8"],
        ["--train-runs", "lora"],
        ["--trials", "0"],
        ["--rounds", "0"],
    ],
)
def test_bench_refuses_bad_input(argv):
    with pytest.raises(ValueError):
        bench.main(["--device", "cpu", *argv])


def test_peft_peer_has_our_parameter_count(tmp_path, one_thread):
    """PEFT's LoRA on the whole fused c_attn (its stand-in for q,v) trains as many parameters as
    ours at the same rank: one A (r × d) and B (3d × r) against two A (r × d) and B (d × r)."""
    pytest.importorskip("peft")
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(tmp_path / "tiny"))
    ours, peft_run = bench.training_runs(peers=True, keys=["lora-qv", "peft-qv"])
    measured = {
        run.library: bench.measure_training(run, str(tmp_path / "tiny"), (2, 8), "cpu", "float32", warmup=0, trials=1)
        for run in (ours, peft_run)
    }
    assert measured["hf"]["trainable params"] == measured["ours"]["trainable params"] == [512]
    assert 0 < measured["hf"]["checkpoint"][0] < 37_000  # the adapter, not the model


def test_training_rows_without_their_reference_have_no_ratio(tmp_path, one_thread, capsys):
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(tmp_path / "tiny"))
    argv = ["--size", str(tmp_path / "tiny"), "--device", "cpu", "--train-shape", "2x8", "--trials", "1"]
    rows = bench.main(
        [
            *argv,
            "--skip-inference",
            "--skip-decoding",
            "--train-runs",
            "lora-qv",
            "--rounds",
            "2",
            "--out",
            str(tmp_path),
        ]
    )
    assert {r["what"] for r in rows} == {"LoRA r=4 q,v"} and all(r["ratio"] is None for r in rows)
    assert next(r["n"] for r in rows if r["metric"] == "step time") == 2  # one step a round, pooled
    printed = capsys.readouterr().out
    assert "| LoRA r=4 q,v |" in printed and "(×" not in printed  # no ratio to a reference that did not run


def test_bench_mixed_writes_its_rows_beside_bench_results(tmp_path, one_thread, capsys):
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(tmp_path / "tiny"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("bench.py's")  # a bench.py run in the same folder stays as it is
    returned = bench_mixed.main(
        ["--size", str(tmp_path / "tiny"), "--device", "cpu", "--mixed", "3x4+3", "--out", str(out)]
    )

    rows = json.loads((out / "mixed_adapters.json").read_text())["rows"]
    auto = str(resolve_dtype("cpu", "auto")).removeprefix("torch.")  # what --dtype auto picks on this CPU
    assert rows == json.loads(json.dumps(returned)) and (out / "results.json").read_text() == "bench.py's"
    ways = {"one mixed batch", bench_mixed.MERGED_PER_ADAPTER, bench_mixed.ONE_MERGED}
    assert sorted((r["what"], r["metric"], r["shape"]) for r in rows) == sorted((w, "tokens/s", "3x4+3") for w in ways)
    for r in rows:
        assert 0 < r["min"] <= r["median"] <= r["max"] and math.isfinite(r["max"])
        assert r["reference"] == bench_mixed.ONE_MERGED and r["dtype"] == auto
        assert r["ratio"] == pytest.approx(r["median"] / next(q["median"] for q in rows if q["what"] == q["reference"]))
    printed = capsys.readouterr().out
    assert "### mixed adapters: " in printed and "| one mixed batch |" in printed


@pytest.mark.parametrize("argv", [["--mixed", "4x16"], ["--mixed", "4x16+0"], ["--size", "gpt-5"]])
def test_bench_mixed_refuses_bad_input(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        bench_mixed.main(["--device", "cpu", *argv])
    assert str(exit_.value).startswith("lab.bench_mixed: error: ") and "\n" not in str(exit_.value)


def test_profile_step_profiles_both_runs_with_bench_flags(tmp_path, one_thread, capsys):
    torch.manual_seed(0)
    GPT(TINY).save_pretrained(str(tmp_path / "tiny"))
    profile_step.main(["--size", str(tmp_path / "tiny"), "--device", "cpu", "--shape", "2x8", "--steps", "1"])
    printed = capsys.readouterr().out
    first_line = printed.splitlines()[0]
    assert first_line.startswith(f"{tmp_path / 'tiny'}, 2x8, cpu (")
    assert first_line.endswith(f", {describe_dtype('cpu', 'auto')}")  # the dtype --dtype auto picks, and why
    assert "=== full fine-tuning: median step" in printed and "=== LoRA r=4 q,v: median step" in printed
    assert printed.count("Self CPU time total") == 2  # one profiler table a run
    with pytest.raises(ValueError, match="unknown --size 'gpt-5'"):
        profile_step.main(["--size", "gpt-5", "--device", "cpu"])
