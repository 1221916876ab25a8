import time

import pytest
import torch
from torch import nn

import utils
from conftest import TINY


@pytest.mark.parametrize(
    "amx, avx512_bf16, dtype, why",
    [
        (True, False, torch.bfloat16, "the CPU has AMX"),
        (False, True, torch.bfloat16, "the CPU has AVX512-BF16"),
        (False, False, torch.float32, "the CPU lacks AMX and AVX512-BF16"),
    ],
)
def test_auto_dtype_on_a_cpu_is_bf16_only_where_it_multiplies_bf16_natively(monkeypatch, amx, avx512_bf16, dtype, why):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    assert utils.resolve_dtype("cpu", "auto") == dtype
    assert utils.describe_dtype("cpu", "auto") == f"{str(dtype).removeprefix('torch.')} (auto: {why})"
    assert utils.resolve_dtype("cpu", "float32") == torch.float32  # asked for: never overridden
    assert utils.describe_dtype("cpu", "bfloat16") == "bfloat16"


def test_an_unknown_dtype_names_the_choices():
    with pytest.raises(ValueError, match="unknown dtype 'half': choose auto, float32, bfloat16, float16"):
        utils.resolve_dtype("cpu", "half")


@pytest.mark.parametrize("transposed", [True, False])
def test_for_inference_lays_the_weights_out_as_the_cpu_multiplies_a_row_faster(tiny_model, monkeypatch, transposed):
    monkeypatch.setattr(utils, "transposed_gemv_is_faster", lambda dtype: transposed)
    x = torch.randint(TINY.vocab_size, (2, 5))
    with torch.no_grad():
        logits, tokens = tiny_model(x)[0], tiny_model.generate(x, 8, temperature=0)
    utils.for_inference(tiny_model, "cpu", torch.float32)
    for w in (m.weight for m in tiny_model.modules() if isinstance(m, nn.Linear)):
        assert w.stride() == ((1, w.size(0)) if transposed else (w.size(1), 1))
    with torch.no_grad():
        assert torch.allclose(tiny_model(x)[0], logits, atol=1e-5)
        assert torch.equal(tiny_model.generate(x, 8, temperature=0), tokens)


@pytest.mark.parametrize("faster", ["transposed", "as stored"])
def test_the_layout_is_chosen_by_timing_both(monkeypatch, faster):
    slow, fast = (0.004, 0.001) if faster == "transposed" else (0.001, 0.004)
    monkeypatch.setattr(utils.F, "linear", lambda x, w: time.sleep(slow if w.is_contiguous() else fast))
    utils.transposed_gemv_is_faster.cache_clear()
    try:
        assert utils.transposed_gemv_is_faster(torch.float32) == (faster == "transposed")
    finally:
        utils.transposed_gemv_is_faster.cache_clear()


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
@pytest.mark.parametrize("faster", [True, False])
def test_attention_is_written_out_only_to_train_in_bf16_where_timed_faster(monkeypatch, dtype, faster):
    monkeypatch.setattr(utils, "written_out_attention_is_faster", lambda dtype: faster)
    monkeypatch.setattr(utils, "written_out_attention", lambda *args: "written out")
    q = torch.randn(1, 2, 4, 8, dtype=dtype)
    written = utils.attention(q, q, q, None, is_causal=True, dropout_p=0.0)
    assert isinstance(written, str) == (faster and dtype == torch.bfloat16)
    long = torch.randn(1, 1, 513, 8, dtype=dtype)  # over 512 keys, flash is faster and keeps less
    assert not isinstance(utils.attention(long, long, long, None, is_causal=True, dropout_p=0.0), str)
    with torch.no_grad():  # inference keeps flash
        assert not isinstance(utils.attention(q, q, q, None, is_causal=True, dropout_p=0.0), str)
