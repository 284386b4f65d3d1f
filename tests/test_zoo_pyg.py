"""Breadth: every model of torch_geometric.nn.models and a two-layer stack of every conv of
torch_geometric.nn.conv, on one tiny random graph, through freeze, one search step, materialize and
a ticket's save and reload (the cycle and the tables: tests/zoo_cases.py).

Tickets name the builder ``zoo_pyg`` that zoo_cases registers with ``timm_fslt.register_builder``,
as a user's own code would. Every case passes or carries its reason: an expected failure
(``PYG_XFAIL``, strict), a skip for a conv that needs a package this install lacks (``PYG_SKIP``), or,
for a name that is not a model to run (a function, a base class, a parameter-free algorithm), an
entry of ``PYG_NOT_MODELS`` checked below.
"""
import pytest
import torch_geometric.nn.conv as C
import torch_geometric.nn.models as M

import zoo_cases as Z


def test_every_conv_and_model_has_a_case_or_a_reason():
    ids = {i.split(":", 1)[1] for i in Z.pyg_ids()}
    for name in list(C.__all__) + list(M.__all__):
        assert name in ids or name in Z.PYG_NOT_MODELS, name
    assert not ids & set(Z.PYG_NOT_MODELS)


@pytest.mark.parametrize("case_id", Z.pyg_params())
def test_pyg_cycle(case_id, tmp_path):
    Z.check_case(Z.pyg_case(case_id), tmp_path)
