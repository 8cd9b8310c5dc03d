"""The extracted plan of the small model, kept as text."""

import pytest

from configs import CONFIGS
from meganeura.compiler.cost import CPU_INTERPRETER, H200, CostModel
from meganeura.models import build
from meganeura.pipeline import optimize_graph as optimize
from meganeura.compiler.report import plan_text
from snapshots import assert_snapshot


@pytest.mark.parametrize("profile, dtype", [(H200, "bf16"), (CPU_INTERPRETER, "fp32")],
                         ids=["h200-bf16", "cpu-fp32"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_plan_snapshot(name, profile, dtype):
    plan, _ = optimize(build(CONFIGS[name], 7), CostModel(profile, dtype))
    assert_snapshot(f"plan-{name}-{profile.name}-{dtype}.txt", plan_text(plan))
