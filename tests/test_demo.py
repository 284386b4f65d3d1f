"""The demo (``fslt demo``): real packaged digits, every source kind, table, plot, results, ticket."""
import json
import logging

import pytest
import torch

from timm_fslt.apps import demo
from timm_fslt import load_ticket

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_packaged_mnist_digits_load_without_download():
    images, labels = demo.load_mnist_5k()
    assert images.shape == (5000, 1, 28, 28) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [500] * 10
    assert images.float().mean() > 10  # real strokes, not an empty array


def test_split_is_disjoint_4_to_1_and_a_function_of_the_seed():
    a, b, other = demo.split_indices(5000, 0), demo.split_indices(5000, 0), demo.split_indices(5000, 1)
    assert a == b and a != other
    assert [len(a[k]) for k in ("train", "val", "test")] == [3200, 800, 1000]
    everything = set(a["train"]) | set(a["val"]) | set(a["test"])
    assert len(everything) == 5000


def test_sparse_point_has_the_free_weights_of_the_frozen_point_it_is_matched_to():
    points = {p.label: p for p in demo.plan([0.7], demo.KINDS)}
    frozen, sparse = points["frozen-0.7"], points["sparse-0.7"]
    assert (frozen.prune, frozen.lock, frozen.sparsity) == pytest.approx((0.35, 0.35, 0.5))
    assert (sparse.prune, sparse.lock, sparse.sparsity) == pytest.approx((0.7, 0.0, 0.85))
    assert 1 - frozen.prune - frozen.lock == pytest.approx(1 - sparse.prune - sparse.lock)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    code = demo.main(["--quick", "--out", str(out), "--no-progress"])
    return code, out


def test_quick_demo_writes_png_plot_and_results_with_every_source_kind(quick_run):
    code, out = quick_run
    assert code == 0
    png = (out / demo.PLOT_FILE).read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000
    import matplotlib.image

    assert matplotlib.image.imread(str(out / demo.PLOT_FILE)).shape[2] in (3, 4)

    results = json.loads((out / demo.RESULTS_FILE).read_text())
    assert {"format", "command", "settings", "data", "runs", "summary", "comparisons", "ticket", "plot",
            "wall_time_s"} <= set(results)
    rows = {s["label"]: s for s in results["summary"]}
    assert set(rows) == {"weights", "dense", "frozen-0.7", "sparse-0.7"}
    for s in rows.values():
        assert {"test_acc", "sparsity", "ticket_bits", "ticket_bytes", "compression_vs_dense_source"} <= set(s)
        assert 0.0 <= s["test_acc"] <= 1.0
    # One bit per free weight: the 70%-frozen and the matched sparse ticket cost 3.3x less than the dense one.
    assert rows["frozen-0.7"]["ticket_bits"] == rows["sparse-0.7"]["ticket_bits"]
    assert rows["dense"]["ticket_bits"] / rows["frozen-0.7"]["ticket_bits"] == pytest.approx(1 / 0.3, rel=1e-3)
    assert rows["frozen-0.7"]["sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert rows["sparse-0.7"]["sparsity"] == pytest.approx(0.85, abs=1e-3)
    assert rows["weights"]["ticket_bits"] == 32 * rows["dense"]["ticket_bits"]  # fp32, no extra state
    comparison = results["comparisons"][0]
    assert comparison["ratio"] == 0.7
    assert comparison["points_vs_sparse_same_size"] == pytest.approx(
        100 * (rows["frozen-0.7"]["test_acc"] - rows["sparse-0.7"]["test_acc"]))


def test_quick_demo_ticket_reloads_with_the_searched_accuracy(quick_run):
    _, out = quick_run
    results = json.loads((out / demo.RESULTS_FILE).read_text())
    ticket = results["ticket"]
    assert ticket["label"] == "frozen-0.7" and ticket["reload_identical"] is True
    model = load_ticket(out / demo.TICKET_DIR)
    test = demo.digit_sets(ticket["seed"])["test"]
    x, y = test.tensors
    with torch.no_grad():
        accuracy = (model(x).argmax(-1) == y).double().mean().item()
    assert accuracy == pytest.approx(ticket["test_acc"], abs=1.5 / len(y))


def test_table_lists_every_method_with_sizes_and_compression(quick_run):
    _, out = quick_run
    summary = json.loads((out / demo.RESULTS_FILE).read_text())["summary"]
    table = demo.format_table(summary)
    for name in ("weights (trained)", "dense source", "frozen source", "sparse source", "ticket bits",
                 "ticket bytes", "3.33x smaller"):
        assert name in table


def _tree(directory):
    """Every file under ``directory`` with its bytes and modification time."""
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_rerun_into_an_earlier_demo_directory_is_refused_and_writes_nothing(quick_run, capsys):
    _, out = quick_run
    before = _tree(out)
    assert demo.main(["--quick", "--methods", "frozen", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"--out: {str(out)!r} already holds the results of an earlier demo run" in err
    assert "results.json, demo.png, ticket/, runs/" in err and "pass --overwrite" in err
    assert _tree(out) == before  # not one byte, not one timestamp


def test_rerun_with_overwrite_replaces_it_with_identical_results(quick_run, capsys, caplog):
    _, out = quick_run
    first = {s["label"]: s["test_acc"] for s in json.loads((out / demo.RESULTS_FILE).read_text())["summary"]}
    with caplog.at_level(logging.INFO, logger="timm_fslt"):
        assert demo.main(["--quick", "--methods", "weights", "frozen", "--out", str(out), "--no-progress",
                          "--overwrite"]) == 0
    results = json.loads((out / demo.RESULTS_FILE).read_text())
    again = {s["label"]: s["test_acc"] for s in results["summary"]}
    assert list(again) == ["weights", "frozen-0.7"]
    # Everything is a function of the seed: weights, freezing pattern, scores, split, batch order.
    assert again == {label: first[label] for label in again}
    captured = capsys.readouterr()
    assert "plot:" in captured.out
    # One info line per run, on stderr through the demo's own logger; stdout keeps only the results.
    assert captured.err.count(": test accuracy") == 2 * len(results["settings"]["seeds"])
    assert ": test accuracy" not in captured.out
    assert {r.name for r in caplog.records if "test accuracy" in r.getMessage()} == {"timm_fslt.apps.demo"}
    assert logging.getLogger("timm_fslt").handlers == []  # the app took its handler off again


def test_quiet_run_prints_only_the_results(tmp_path, capsys):
    out = tmp_path / "quiet"
    assert demo.main(["--quick", "--quiet", "--methods", "frozen", "--seeds", "0", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""  # no bar (the demo's or the training loop's), no info line
    assert "frozen source" in captured.out and f"results: {out / demo.RESULTS_FILE}" in captured.out
    assert json.loads((out / demo.RESULTS_FILE).read_text())["settings"]["progress"] is False


def test_quick_and_full_runs_default_to_their_own_directories(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert demo.parse_args([]).out == "fslt_demo"
    assert demo.parse_args(["--quick"]).out == "fslt_demo_quick"
    assert demo.parse_args(["--quick", "--out", "mine"]).out == "mine"
    assert "fslt_demo_quick/ with --quick" in " ".join(demo.build_parser().format_help().split())
    assert list(tmp_path.iterdir()) == []  # parsing writes nothing


@pytest.mark.parametrize("argv, words", [
    (["--ratios", "1.5"], "--ratios"),
    (["--epochs", "0"], "--epochs"),
    (["--seeds", "-1"], "--seeds"),
    (["--methods", "magic"], "--methods"),
    (["--model", "no_such_model"], "--model"),
])
def test_bad_arguments_exit_2_naming_the_option(argv, words, tmp_path, capsys):
    assert demo.main(argv + ["--out", str(tmp_path / "o")]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_foreign_non_empty_out_dir_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    assert demo.main(["--quick", "--out", str(tmp_path)]) == 2
    assert "--out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_out_that_is_a_file_is_refused_even_with_overwrite(tmp_path, capsys):
    target = tmp_path / "results"
    target.write_text("keep me")
    assert demo.main(["--quick", "--overwrite", "--out", str(target)]) == 2
    assert f"--out: {str(target)!r} exists and is not a directory" in capsys.readouterr().err
    assert target.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["results"]


def test_earlier_results_without_the_marker_still_count_as_an_earlier_run(tmp_path):
    # A results.json of the demo's format is enough (an older demo wrote no marker file).
    (tmp_path / demo.RESULTS_FILE).write_text(json.dumps({"format": demo.DEMO_FORMAT}))
    with pytest.raises(ValueError, match="already holds the results of an earlier demo run \\(results.json\\)"):
        demo.prepare_out(tmp_path, overwrite=False)
    with pytest.raises(TypeError, match="overwrite must be True or False, got 'yes'"):
        demo.prepare_out(tmp_path, overwrite="yes")
    assert [p.name for p in tmp_path.iterdir()] == [demo.RESULTS_FILE]


def test_a_directory_with_only_the_marker_is_not_an_earlier_run(tmp_path):
    # An interrupted run that wrote nothing yet: there is nothing to replace, so no --overwrite is needed.
    demo.prepare_out(tmp_path, overwrite=False)
    demo.prepare_out(tmp_path, overwrite=False)
    assert [p.name for p in tmp_path.iterdir()] == [".fslt_demo"]


def test_cli_dispatches_demo_subcommand(capsys):
    from timm_fslt.apps.cli import main

    assert main(["demo", "--help"]) == 0
    assert "--ratios" in capsys.readouterr().out


@pytest.mark.slow
def test_default_settings_frozen_ticket_beats_chance_by_a_wide_margin(tmp_path):
    # The full default demo exceeds the suite's budget; its 70%-frozen point alone uses the defaults.
    out = tmp_path / "out"
    assert demo.main(["--methods", "frozen", "--ratios", "0.7", "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / demo.RESULTS_FILE).read_text())
    (row,) = results["summary"]
    assert results["settings"]["epochs"] == demo.DEFAULTS["epochs"]
    assert row["test_acc"] > 0.8  # chance is 0.1 on ten balanced classes
