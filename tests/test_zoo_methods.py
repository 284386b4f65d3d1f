"""Breadth for the search methods (issue #18): a sample of the zoos -- every eighth timm family
and every eighth PyG case, in sorted order -- through the whole zoo cycle (freeze, one search
step that must move a mask, materialize, a ticket's save and reload with identical outputs, and
the ticket's stored-state check) under multicoated, IteRand (re-drawn at the first step) and an
annealed Edge-Popup in turn."""
import pytest

import zoo_cases as Z

METHODS = [
    {"method": "multicoated", "coat_sparsities": (0.5, 0.55, 0.6)},
    {"method": "iterand", "rerand_period": 1, "rerand_rate": 0.5},
    {"sparsity_schedule": ("linear", 0.4, 0.5), "schedule_steps": 2},
]
NAMES = ["multicoated", "iterand", "schedule"]


def _sample(params: list) -> list:
    runnable = [p for p in params if not p.marks]
    out = []
    for i, p in enumerate(runnable[::8]):
        kwargs = METHODS[i % len(METHODS)]
        out.append(pytest.param(p.values[0], kwargs, id=f"{p.values[0]}-{NAMES[i % len(METHODS)]}"))
    return out


@pytest.mark.parametrize("module, kwargs", _sample(Z.timm_params()))
def test_timm_family_cycle_under_a_method(module, kwargs, tmp_path):
    Z.check_case(Z.timm_case(Z.TIMM[module]), tmp_path, kwargs)


@pytest.mark.parametrize("case_id, kwargs", _sample(Z.pyg_params()))
def test_pyg_cycle_under_a_method(case_id, kwargs, tmp_path):
    Z.check_case(Z.pyg_case(case_id), tmp_path, kwargs)
