import pytest
import torch

import utils


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
