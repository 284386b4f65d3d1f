"""Breadth: the smallest model of every timm architecture family through freeze, one search step,
materialize, and a ticket's save and reload (the cycle and the tables: tests/zoo_cases.py).

Every family passes, or carries its reason: an expected failure (``TIMM_XFAIL``, strict: it fails
the run once the model passes, so the entry is flipped), or, for the few families too slow for the
default run, a skip naming the model's size (run them with ``FSLT_ZOO_FULL=1``).
"""
import pytest
import timm
from timm.models import _registry

import zoo_cases as Z


def test_every_timm_family_has_a_case():
    assert sorted(Z.TIMM) == sorted(timm.list_modules())


def test_each_case_is_a_model_of_its_family():
    for module, spec in Z.TIMM.items():
        if spec.model.startswith("class:"):
            assert spec.model[len("class:"):].split(".")[0] == module, module
        else:
            assert _registry._model_to_module.get(spec.model) == module, (module, spec.model)


@pytest.mark.parametrize("module", Z.timm_params())
def test_timm_family_cycle(module, tmp_path):
    Z.check_case(Z.timm_case(Z.TIMM[module]), tmp_path)
