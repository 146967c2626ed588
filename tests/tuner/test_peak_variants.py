"""The peak benchmark's variants: what each counts as a flop, and the C it renders (nothing timed)."""
from __future__ import annotations

import pytest

from looptune.runtime.compiler.machine import detect_cpu
from looptune.tuner.measure.peak import PeakVariant, measure_peak_gflops, render_variant, variants


def test_a_bfloat16_lane_counts_two_products():
    fp32, bf16 = PeakVariant("avx512", 512, "float32", 16), PeakVariant("avx512", 512, "bfloat16", 16)
    assert fp32.lanes == bf16.lanes == 16
    assert bf16.flops_per_iter == 2 * fp32.flops_per_iter == 2 * 2 * 16 * 16


def test_bfloat16_chains_are_vdpbf16ps_compiled_for_that_target_only():
    text = render_variant(PeakVariant("avx512", 512, "bfloat16", 12))
    assert text.count("_mm512_dpbf16_ps(") == 12
    assert 'target("avx512f,avx512bf16")' in text
    assert "_mm512_dpbf16_ps" not in render_variant(PeakVariant("avx512", 512, "float32", 12))


def test_bfloat16_variants_only_where_the_code_generator_would_use_the_instruction():
    assert variants("avx2", "bfloat16") == [] and variants("portable", "bfloat16") == []
    has_bf16 = detect_cpu().vector_isa == "avx512" and detect_cpu().bf16_isa != "convert"
    assert bool(variants("avx512", "bfloat16")) == has_bf16


def test_no_bfloat16_peak_without_the_instructions(monkeypatch):
    monkeypatch.setenv("LOOPTUNE_ISA", "avx2")
    with pytest.raises(ValueError, match="no bfloat16"):
        measure_peak_gflops("bfloat16")
    with pytest.raises(ValueError, match="dtype must be"):
        measure_peak_gflops("int8")


def test_a_float16_peak_is_float32s():
    """float16 kernels widen their inputs to float32 and accumulate there: one float32 FMA lane per
    product, so the same chains measure their peak (no float16 arithmetic is timed)."""
    fp32, fp16 = PeakVariant("avx512", 512, "float32", 16), PeakVariant("avx512", 512, "float16", 16)
    assert fp16.lanes == fp32.lanes == 16 and fp16.flops_per_iter == fp32.flops_per_iter
    for isa in ("avx512", "avx2", "neon", "portable"):
        assert variants(isa, "float16") == variants(isa, "float32")
