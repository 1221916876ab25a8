import random

import numpy as np
import pytest
import torch
from torch import nn

import bench
import utils
from conftest import REAL_CPU_VENDOR, TINY
from model import GPT


@pytest.mark.parametrize(
    "amx, avx512_bf16, vendor, dtype, why",
    [
        (True, False, "Intel", torch.bfloat16, "the CPU has AMX"),
        (True, True, "Intel", torch.bfloat16, "the CPU has AMX"),
        (False, True, "AMD", torch.bfloat16, "the CPU has AVX512-BF16"),
        (False, True, "Intel", torch.float32, "AVX512-BF16 without AMX, not an AMD: fp32 matmuls are the faster ones"),
        (False, True, "", torch.float32, "AVX512-BF16 without AMX, not an AMD: fp32 matmuls are the faster ones"),
        (False, False, "AMD", torch.float32, "the CPU lacks AMX and AVX512-BF16"),
    ],
)
def test_auto_dtype_on_a_cpu_is_bf16_only_where_its_bf16_matmuls_are_the_faster(
    monkeypatch, amx, avx512_bf16, vendor, dtype, why
):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(utils, "cpu_vendor", lambda: vendor)
    assert utils.resolve_dtype("cpu", "auto") == dtype
    assert utils.describe_dtype("cpu", "auto") == f"{str(dtype).removeprefix('torch.')} (auto: {why})"
    assert utils.resolve_dtype("cpu", "float32") == torch.float32  # asked for: never overridden
    assert utils.describe_dtype("cpu", "bfloat16") == "bfloat16"


def test_the_cpus_vendor_is_read_from_proc_cpuinfo_or_else_the_platform(monkeypatch, tmp_path):
    monkeypatch.setattr(utils, "cpu_vendor", REAL_CPU_VENDOR)  # FAKE_CPU_BF16 fakes it for the session
    cpuinfo = tmp_path / "cpuinfo"
    for text, vendor in [("vendor_id\t: AuthenticAMD\n", "AMD"), ("vendor_id\t: GenuineIntel\n", "Intel"), ("", "")]:
        cpuinfo.write_text(text)
        assert utils.cpu_vendor(str(cpuinfo)) == vendor
    monkeypatch.setattr(utils.platform, "processor", lambda: "AMD64 Family 25 Model 17 Stepping 1, AuthenticAMD")
    assert utils.cpu_vendor(str(tmp_path / "absent")) == "AMD"  # Windows: no /proc/cpuinfo


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'half': choose auto, float32, bfloat16, float16"):
        utils.resolve_dtype("cpu", "half")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_for_inference_stores_fp32_weights_transposed_by_rule_and_decodes_the_same(tiny_model, dtype):
    x = torch.randint(TINY.vocab_size, (2, 5))
    tiny_model.to(dtype)
    with torch.no_grad():
        logits, tokens = tiny_model(x)[0], tiny_model.generate(x, 8, temperature=0)
    utils.for_inference(tiny_model, "cpu", dtype)
    transposed = dtype == torch.float32
    for w in (m.weight for m in tiny_model.modules() if isinstance(m, nn.Linear)):
        assert w.stride() == ((1, w.size(0)) if transposed else (w.size(1), 1))
    with torch.no_grad():
        after = tiny_model(x)[0]
        assert torch.allclose(after, logits, atol=1e-5) if transposed else torch.equal(after, logits)
        assert torch.equal(tiny_model.generate(x, 8, temperature=0), tokens)


@pytest.mark.parametrize("where", ["causal", "after a past", "one new token"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_written_out_equals_torchs_in_values_and_gradients(where, dtype):
    torch.manual_seed(0)
    T, past = {"causal": (6, 0), "after a past": (3, 4), "one new token": (1, 5)}[where]
    q, k, v = torch.randn(2, 3, T, 8), torch.randn(2, 3, past + T, 8), torch.randn(2, 3, past + T, 8)
    mask = torch.ones(T, past + T, dtype=torch.bool).tril(past) if past and T > 1 else None

    def attend(attention):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        y = attention(*inputs, mask, is_causal=past == 0, dropout_p=0.0)
        y.float().pow(2).sum().backward()
        return [y.float(), *(t.grad.float() for t in inputs)]

    def torchs(q, k, v, mask, is_causal, dropout_p):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, mask, dropout_p, is_causal)

    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.03, rtol=0.03)
    for written, reference in zip(attend(utils.written_out_attention), attend(torchs)):
        assert torch.allclose(written, reference, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_is_written_out_only_to_train_in_bf16_by_rule(monkeypatch, dtype):
    monkeypatch.setattr(utils, "written_out_attention", lambda *args: "written out")
    q = torch.randn(1, 2, 4, 8, dtype=dtype)
    written = utils.attention(q, q, q, None, is_causal=True, dropout_p=0.0)
    assert isinstance(written, str) == (dtype == torch.bfloat16)
    long = torch.randn(1, 1, 513, 8, dtype=dtype)  # over 512 keys, flash is faster and keeps less
    assert not isinstance(utils.attention(long, long, long, None, is_causal=True, dropout_p=0.0), str)
    with torch.no_grad():  # inference keeps flash
        assert not isinstance(utils.attention(q, q, q, None, is_causal=True, dropout_p=0.0), str)


def global_rng_states() -> tuple:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def same_states(a: tuple, b: tuple) -> bool:
    (torch_a, numpy_a, python_a), (torch_b, numpy_b, python_b) = a, b
    numpy_same = all(np.array_equal(x, y) for x, y in zip(numpy_a, numpy_b))
    return torch.equal(torch_a, torch_b) and numpy_same and python_a == python_b


PROBES = {  # each given a tiny GPT built beforehand (building one draws its initial weights, as it should)
    "cpu_bf16_matmul": lambda model: utils.cpu_bf16_matmul(),
    "resolve_dtype": lambda model: utils.resolve_dtype("cpu", "auto"),
    "describe_dtype": lambda model: utils.describe_dtype("cpu", "auto"),
    "for_inference": lambda model: [utils.for_inference(model, "cpu", d) for d in (torch.float32, torch.bfloat16)],
    "attention": lambda model: [
        utils.attention(*[torch.ones(1, 2, 8, 4, dtype=d, requires_grad=True)] * 3, None, True, 0.0).sum().backward()
        for d in (torch.float32, torch.bfloat16)
    ],
    "describe_device": lambda model: bench.describe_device("cpu"),
    "matmul_peak": lambda model: bench.matmul_peak("cpu", torch.float32, 64, trials=1),
}


@pytest.mark.parametrize("probe", PROBES)
def test_nothing_that_probes_or_times_draws_from_a_global_random_generator(probe):
    """A probe that drew from the global generators shifted every later draw: after a --resume (which puts
    the saved states back) the dropout masks no longer matched the straight run's. The suite runs this under
    each FAKE_CPU_BF16 kind (conftest.py)."""
    model = GPT(TINY)
    before = global_rng_states()
    PROBES[probe](model)
    assert same_states(before, global_rng_states())
