"""The held-out model set (tools/shapes/models.txt) is what its README says: at least 30 problems
from real models, none of them in the presets, the embedded database or the shipped policy's
training mix, so figures measured on it speak for shapes LoopTune never saw."""
from pathlib import Path

from looptune.database import load
from looptune.runtime.compiler.workload import read_shapes
from looptune.runtime.configuration import embedded_db_path
from looptune.tuner.agent.trainset import SHIPPED_MIX, generated_mix
from looptune.tuner.ship.presets import PRESETS, preset_problems

SHAPES = Path(__file__).resolve().parents[2] / "tools" / "shapes"


def sizes(p):
    return (p.m, p.n, p.k, p.batch, p.dtype, p.layout)


def test_the_model_set_is_held_out():
    held_out = read_shapes(SHAPES / "models.txt")
    assert len(held_out) >= 30 and len({sizes(p) for p in held_out}) == len(held_out)
    seen = {sizes(p) for name in PRESETS for p in preset_problems(name)}
    seen |= {sizes(r.problem) for r in load(embedded_db_path())}
    seen |= {sizes(p) for p in generated_mix(256 + 16, seed=1, mix=SHIPPED_MIX)}   # tools/train.py's shipped run
    assert not [p for p in held_out if sizes(p) in seen]
