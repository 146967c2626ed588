"""The generated training mixes: deterministic, distinct, capped, disjoint from held-out sets;
the broad mix's large problems are measured on their tuning proxy."""
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.trainset import (MAX_PROXY_FLOPS, MAX_TRAIN_FLOPS, MIXES, SHIPPED_MIX, generated_mix,
                                           measured_problem)
from looptune.tuner.search.proxy import proxy_problem


def test_mix_is_deterministic_distinct_and_capped():
    a, b = generated_mix(200, seed=3), generated_mix(200, seed=3)
    assert a == b and len(set(a)) == 200
    assert all(measured_problem(p).flops <= max(MAX_TRAIN_FLOPS, MAX_PROXY_FLOPS) for p in a)
    assert generated_mix(50, seed=4) != a[:50]
    small = generated_mix(200, seed=3, mix="small")
    assert small == generated_mix(200, seed=3, mix="small") and len(set(small)) == 200
    assert all(p.flops <= MAX_TRAIN_FLOPS for p in small)       # the small mix: every problem at its size


def test_the_mixes_keep_their_problems():
    """The training commands must regenerate their training sets: the first problems of seed 1
    are those the shipped policy (broad) and the previous one (small) were trained on."""
    assert SHIPPED_MIX == "broad" and set(MIXES) == {"small", "broad"}
    assert [p.key() for p in generated_mix(4, seed=1)] == [
        "matmul:float32:nn:t1:b1:1x155x356", "matmul:float32:nn:t1:b1:4560x14x39",
        "matmul:float64:nn:t1:b1:64x240x176", "matmul:float32:nn:t1:b1:489x814x405"]
    assert [p.key() for p in generated_mix(4, seed=1, mix="small")] == [
        "matmul:float32:nn:t1:b1:1x155x356", "matmul:float32:nn:t1:b1:211x124x65",
        "matmul:float64:nn:t1:b1:160x160x208", "matmul:float32:nn:t1:b1:36x515x25"]


def test_mix_covers_the_families():
    for mix in MIXES:
        ps = generated_mix(300, seed=0, mix=mix)
        assert any(p.m <= 32 and p.n >= 64 for p in ps)                 # skinny
        assert any(p.dtype == "float64" for p in ps)
        assert {p.layout for p in ps} >= {"nn", "tn", "nt"}
        assert any(p.batch > 1 for p in ps)
        assert any(p.threads == 2 for p in ps)
        assert any(max(p.m, p.n) >= 512 and min(p.m, p.n) <= 64 for p in ps)   # tall or wide
    broad = generated_mix(300, seed=0, mix="broad")
    assert 0.2 < sum(p.threads == 2 for p in broad) / len(broad) < 0.4


def test_large_problems_are_measured_on_their_tuning_proxy():
    ps = generated_mix(300, seed=0)
    large = [p for p in ps if p.flops > MAX_TRAIN_FLOPS]
    assert any(p.m <= 4 and p.n * p.k >= 4096 * 2048 for p in large)       # decode with LLM widths
    assert any(min(p.m, p.n, p.k) >= 384 for p in large)                    # large products
    for p in large:
        assert measured_problem(p) == proxy_problem(p) and measured_problem(p).flops <= MAX_PROXY_FLOPS
    small = [p for p in ps if p.flops <= MAX_TRAIN_FLOPS]
    assert all(measured_problem(p) == p for p in small)


def test_excluded_problems_never_appear():
    for mix in MIXES:
        base = generated_mix(100, seed=5, mix=mix)
        held = base[::7]
        again = generated_mix(100, seed=5, exclude=held + [MatmulProblem(1, 1024, 1024)], mix=mix)
        assert not set(held) & set(again)
