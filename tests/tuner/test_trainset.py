"""The generated training mix: deterministic, distinct, capped, and disjoint from held-out sets."""
from looptune.runtime.compiler.workload import MatmulProblem
from looptune.tuner.agent.trainset import MAX_TRAIN_FLOPS, generated_mix


def test_mix_is_deterministic_distinct_and_capped():
    a, b = generated_mix(200, seed=3), generated_mix(200, seed=3)
    assert a == b and len(set(a)) == 200
    assert all(p.flops <= MAX_TRAIN_FLOPS for p in a)
    assert generated_mix(50, seed=4) != a[:50]


def test_mix_covers_the_families():
    ps = generated_mix(300, seed=0)
    assert any(p.m <= 32 and p.n >= 64 for p in ps)                 # skinny
    assert any(p.dtype == "float64" for p in ps)
    assert {p.layout for p in ps} >= {"nn", "tn", "nt"}
    assert any(p.batch > 1 for p in ps)
    assert any(p.threads == 2 for p in ps)
    assert any(max(p.m, p.n) >= 512 and min(p.m, p.n) <= 64 for p in ps)   # tall or wide


def test_excluded_problems_never_appear():
    base = generated_mix(100, seed=5)
    held = base[::7]
    again = generated_mix(100, seed=5, exclude=held + [MatmulProblem(1, 1024, 1024)])
    assert not set(held) & set(again)
