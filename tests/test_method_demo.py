"""``fslt demo --compare-methods`` (timm_fslt.apps.compare_methods): every method in both sources,
a table, a plot and results.json on a tiny setting; bad options refused before anything trains."""
import json

import pytest

from timm_fslt.apps import compare_methods, demo
from timm_fslt.apps.cli import main as cli_main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("compare") / "out"
    try:
        code = demo.main(["--compare-methods", "--quick", "--out", str(out), "--quiet"])
    finally:
        torch.set_num_threads(threads)
    return code, out


def test_quick_comparison_writes_table_plot_and_results(quick, capsys):
    code, out = quick
    assert code == 0
    assert (out / compare_methods.PLOT_FILE).read_bytes().startswith(PNG_SIGNATURE)
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == compare_methods.FORMAT and results["machine"]["cpu"]
    labels = {s["label"] for s in results["summary"]}
    assert labels == {f"{src}-{m}" for src in ("frozen", "sparse") for m in compare_methods.METHODS}
    runs = {r["label"]: r for r in results["runs"]}
    assert all(r["seed"] == 0 and r["global_steps"] == 4 for r in runs.values())  # --quick: 1 epoch of 4 batches
    for src, (prune, lock) in (("frozen", (0.35, 0.35)), ("sparse", (0.7, 0.0))):
        ep, mc, it = (runs[f"{src}-{m}"] for m in compare_methods.METHODS)
        assert (ep["prune"], ep["lock"]) == (prune, lock) and ep["free"] == mc["free"] == it["free"]
        assert ep["freeze"].get("method", "edge_popup") == "edge_popup"
        assert mc["freeze"]["method"] == "multicoated" and len(mc["freeze"]["coat_sparsities"]) == 2
        assert mc["freeze"]["scale"] is None
        assert (it["freeze"]["method"], it["freeze"]["rerand_period"]) == ("iterand", 2)
        # sizes: Edge-Popup's entropy-coded mask is about a bit per free weight; a multicoated level
        # (0..2) and an IteRand round cost more
        assert 0.9 < ep["mask_coded_bits_per_free_weight"] <= 1.01
        assert mc["ticket_bits"] > ep["ticket_bits"] and it["ticket_bits"] > ep["ticket_bits"]
        assert ep["sparsity"] == pytest.approx(mc["sparsity"], abs=1e-3)
    rows = {s["label"]: s for s in results["summary"]}
    assert "vs_edge_popup" not in rows["frozen-edge_popup"]
    diff = rows["frozen-iterand"]["vs_edge_popup"]
    assert diff["points"] == pytest.approx(100 * (runs["frozen-iterand"]["test_acc"] - runs["frozen-edge_popup"]["test_acc"]))
    assert "IteRand" in results["table"] and "multicoated" in results["table"]


def test_comparison_with_a_schedule_and_refusals(tmp_path, capsys):
    args = compare_methods.parse_args(["--sparsity-schedule", "cosine", "0.5", "--quick"])
    opts = compare_methods.method_options(args, compare_methods.Run("frozen", "iterand"), 40)
    assert opts["sparsity_schedule"] == ("cosine", 0.35, 0.5) and opts["schedule_steps"] == 40
    code = demo.main(["--compare-methods", "--quick", "--sparsity-schedule", "steep", "0.5",
                      "--out", str(tmp_path / "bad")])
    assert code == 2 and "shape must be one of" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()  # refused before the output folder is made
    assert demo.main(["--compare-methods", "--rerand-rate", "2", "--out", str(tmp_path / "bad")]) == 2
    assert "--rerand-rate must lie in (0, 1]" in capsys.readouterr().err


def test_cli_reaches_the_comparison(capsys):
    assert cli_main(["demo", "--compare-methods", "--help"]) == 0
    assert "fslt demo --compare-methods" in capsys.readouterr().out
