"""`mrpf report` on a grid with seeds, extra runs and a fine-tuning-length curve: the
numbers it prints are the ones the statistics module gives for the runs' outcomes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrpf import reporting, workflow
from mrpf.statistics import seed_image_difference

GRID = {"datasets": ["cifar10"], "archs": ["vgg11_w8"], "train_methods": ["pgd_at"],
        "prune_methods": ["mrpf", "uniform_l1"], "sparsities": [0.9], "seeds": [0, 1, 2],
        "extra_runs": [{"prune_methods": ["mrpf", "uniform_l1"], "sparsities": [0.9], "seeds": [0], "tag": "ft2",
                        "params": {"prune": {"final_epochs": 2}}},
                       {"prune_methods": ["mrpf"], "sparsities": [0.9], "seeds": [0, 1], "tag": "lc",
                        "params": {"prune": {"allocation": "loss_curve"}}},
                       {"prune_methods": ["mrpf", "uniform_l1"], "sparsities": [0.7], "seeds": [0], "tag": "lat",
                        "params": {"prune": {"metric": "latency"}}},
                       {"prune_methods": ["uniform_l1"], "sparsities": [0.9], "seeds": [0, 1, 2], "tag": "ft8",
                        "params": {"prune": {"final_epochs": 7}}}],
        "control_tag": "ft8"}
IMAGES = 400


def write_run(folder: Path, rng: np.random.Generator, p_pgd: float, epochs: int | None, macs: int) -> dict:
    folder.mkdir(parents=True)
    outcomes = {"clean": rng.random(IMAGES) < p_pgd + 0.2, "pgd": rng.random(IMAGES) < p_pgd}
    np.savez(folder / "eval_per_image.npz", **outcomes)
    metrics = {f"{k}_acc": float(v.mean()) for k, v in outcomes.items()}
    (folder / "eval.json").write_text(json.dumps(dict(metrics, params=1000, macs=macs, pgd_steps=20)))
    if epochs is not None:
        (folder / "prune.json").write_text(json.dumps({"steps": [{"finetune": {"epochs": 1}},
                                                                 {"finetune": {"epochs": epochs - 1}}]}))
    return outcomes


@pytest.fixture
def report(tmp_path):
    config = {"grid": "g", "grids": {"g": GRID}}
    rng = np.random.default_rng(0)
    results = tmp_path / "results"
    base = results / "cifar10/vgg11_w8/pgd_at"
    outcomes = {"dense": write_run(base / "dense", rng, 0.4, None, 1000)}
    for run in workflow.pruned_runs(GRID):
        epochs = 8 if run.tag == "ft8" else 3 if run.tag else 5
        p_pgd = 0.33 if run.pm == "mrpf" else 0.32 if run.tag == "ft8" else 0.30
        outcomes[run.name] = write_run(base / run.name, rng, p_pgd, epochs, 100)
        if run.tag == "lat":   # what mrpf prune records under a latency budget
            record = json.loads((base / run.name / "prune.json").read_text())
            record.update(metric="latency", achieved=0.701 if run.pm == "mrpf" else 0.703,
                          measured_achieved=0.68 if run.pm == "mrpf" else 0.72,
                          measured_latency_ms={"dense": 50.0, "pruned": 16.0, "batch": 128})
            (base / run.name / "prune.json").write_text(json.dumps(record))
    rows = reporting.write_report(config, results, tmp_path / "reports", log=lambda *_: None)
    return tmp_path / "reports", rows, outcomes


def test_seed_rows_give_mean_sd_and_the_seeds_by_images_interval(report):
    folder, rows, outcomes = report
    summary = (folder / "summary.md").read_text()
    seeds = [0, 1, 2]
    mine = np.stack([outcomes[f"mrpf-0.9-s{s}"]["pgd"] for s in seeds])
    theirs = np.stack([outcomes[f"uniform_l1-0.9-s{s}"]["pgd"] for s in seeds])
    d = seed_image_difference(mine, theirs)
    accuracies = mine.mean(1)
    mean_sd = f"{100 * accuracies.mean():.1f} ± {100 * accuracies.std(ddof=1):.1f}"
    interval = f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (3 seeds)"
    line = next(x for x in summary.splitlines() if x.startswith("| mrpf ") and "| 0,1,2 " in x)
    assert mean_sd in line and interval in line, line
    # the per-seed rows carry the paired interval of their own seed only
    one = seed_image_difference(mine[1:2], theirs[1:2])
    row = next(r for r in rows if r["run"] == "mrpf-0.9-s1")
    assert row["delta_pgd"] == pytest.approx(one)


def test_finetune_curve_lists_each_length_of_seed_0(report):
    folder, rows, outcomes = report
    summary = (folder / "summary.md").read_text()
    curve = summary.split("### Fine-tuning length (seed 0)")[1]
    lines = [x for x in curve.splitlines() if x.startswith("| mrpf ") or x.startswith("| uniform_l1 ")]
    assert [(x.split("|")[1].strip(), x.split("|")[3].strip()) for x in lines] == [
        ("uniform_l1", "3"), ("uniform_l1", "5"), ("uniform_l1", "8"), ("mrpf", "3"), ("mrpf", "5")]
    csv = (folder / "robustness.csv").read_text().splitlines()
    assert csv[0].startswith("dataset,arch,tm,run,method,sparsity,seed,tag,finetune_epochs")
    assert len(csv) == 1 + 1 + len(workflow.pruned_runs(GRID))
    assert (folder / "robustness.png").stat().st_size > 10_000


def test_a_block_without_uniform_l1_is_compared_with_the_main_runs(report):
    folder, rows, outcomes = report
    summary = (folder / "summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("| mrpf ") and "lc (vs uniform_l1 main)" in x)
    mine = np.stack([outcomes[f"mrpf-0.9-s{s}-lc"]["pgd"] for s in (0, 1)])
    uniform = np.stack([outcomes[f"uniform_l1-0.9-s{s}"]["pgd"] for s in (0, 1)])
    main = np.stack([outcomes[f"mrpf-0.9-s{s}"]["pgd"] for s in (0, 1)])
    for d in (seed_image_difference(mine, uniform), seed_image_difference(mine, main)):
        assert f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (2 seeds)" in line, line
    row = next(r for r in rows if r["run"] == "mrpf-0.9-s1-lc")
    assert row["delta_pgd"] == pytest.approx(seed_image_difference(mine[1:], uniform[1:]))


def test_latency_budgeted_runs_get_predicted_and_measured_reductions_and_their_paired_difference(report):
    folder, rows, outcomes = report
    section = (folder / "summary.md").read_text().split("### Latency budgets")[1].split("###")[0]
    mine = next(x for x in section.splitlines() if x.startswith("| mrpf-0.7-s0-lat "))
    d = seed_image_difference(outcomes["mrpf-0.7-s0-lat"]["pgd"][None], outcomes["uniform_l1-0.7-s0-lat"]["pgd"][None])
    cells = [c.strip() for c in mine.split("|")[1:-1]]
    assert cells[1:5] == ["70.0", "70.1", "68.0", "128"]
    assert cells[6] == f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
    assert "| uniform_l1-0.7-s0-lat " in section and "mrpf-0.9-s0 " not in section


def test_a_grid_still_running_is_reported_with_the_rows_it_has(report, tmp_path):
    """Before the dense model is evaluated (the pipeline evaluates it with AutoAttack, late), the
    pruned runs are reported without their MACs reduction."""
    folder, rows, outcomes = report
    base = tmp_path / "results/cifar10/vgg11_w8/pgd_at"
    (base / "dense/eval.json").unlink()
    (base / "dense/train_metrics.json").write_text(json.dumps({"train_seconds": 600.0}))
    record = json.loads((base / "mrpf-0.9-s1/prune.json").read_text())
    record["steps"][0]["scoring_seconds"] = 12.0
    (base / "mrpf-0.9-s1/prune.json").write_text(json.dumps(record))
    config = {"grid": "g", "grids": {"g": GRID}}
    partial = reporting.write_report(config, tmp_path / "results", tmp_path / "partial", log=lambda *_: None)
    row = next(r for r in partial if r["run"] == "mrpf-0.9-s1")
    assert row["reduction"] is None and row["delta_pgd"] == pytest.approx(
        next(r for r in rows if r["run"] == "mrpf-0.9-s1")["delta_pgd"])
    assert "| mrpf " in (tmp_path / "partial/summary.md").read_text()
    assert row["scoring_share"] == pytest.approx(12.0 / 600.0)   # costs need no evaluation


def test_the_scoring_cost_over_seeds_is_the_median_so_one_slowed_job_does_not_move_it(report, tmp_path):
    """A job paused or slowed by another on the same cores reports a long wall time; the
    seed summary's scoring share is the median over the seeds, not the mean."""
    base = tmp_path / "results/cifar10/vgg11_w8/pgd_at"
    (base / "dense/train_metrics.json").write_text(json.dumps({"train_seconds": 1000.0}))
    for seed, seconds in ((0, 40.0), (1, 900.0), (2, 50.0)):
        record = json.loads((base / f"mrpf-0.9-s{seed}/prune.json").read_text())
        record["steps"][0]["scoring_seconds"] = seconds
        (base / f"mrpf-0.9-s{seed}/prune.json").write_text(json.dumps(record))
    config = {"grid": "g", "grids": {"g": GRID}}
    reporting.write_report(config, tmp_path / "results", tmp_path / "costs", log=lambda *_: None)
    summary = (tmp_path / "costs/summary.md").read_text()
    line = next(x for x in summary.splitlines() if x.startswith("| mrpf ") and "| 0,1,2 " in x)
    assert line.rstrip(" |").endswith("| 5.0"), line   # median of 4.0, 90.0, 5.0 %; the mean would be 33.0


def test_the_scoring_cost_is_also_reported_over_the_runs_own_fine_tuning_time(report, tmp_path):
    """Runs of one grid made on machines of different speed compare by a ratio of two timings of
    the same job: scoring seconds over that job's fine-tuning seconds, the median over seeds."""
    base = tmp_path / "results/cifar10/vgg11_w8/pgd_at"
    for seed, (scoring, finetune) in ((0, (30.0, 100.0)), (1, (10.0, 100.0)), (2, (60.0, 100.0))):
        record = json.loads((base / f"mrpf-0.9-s{seed}/prune.json").read_text())
        record["steps"][0]["scoring_seconds"] = scoring
        record["steps"][0]["finetune"]["train_seconds"] = finetune / 2
        record["steps"][1]["finetune"]["train_seconds"] = finetune / 2
        (base / f"mrpf-0.9-s{seed}/prune.json").write_text(json.dumps(record))
    config = {"grid": "g", "grids": {"g": GRID}}
    reporting.write_report(config, tmp_path / "results", tmp_path / "ratio", log=lambda *_: None)
    lines = (tmp_path / "ratio/summary.md").read_text().split("### Over fine-tuning seeds")[1].splitlines()
    header = [c.strip() for c in next(x for x in lines if x.startswith("| method")).split("|")[1:-1]]
    column = header.index("scoring / own fine-tuning time (median)")
    line = next(x for x in lines if x.startswith("| mrpf ") and "| 0,1,2 " in x)
    assert [c.strip() for c in line.split("|")[1:-1]][column] == "0.30"   # median of 0.3, 0.1, 0.6
    uniform = next(x for x in lines if x.startswith("| uniform_l1 ") and "| 0,1,2 " in x)
    assert [c.strip() for c in uniform.split("|")[1:-1]][column] == "—"   # no fine-tuning time recorded


def test_kept_channels_per_group_come_from_prune_json_without_a_checkpoint(report, tmp_path):
    """The widths table reads each group's kept and dense channels from prune.json in the layer
    order the run wrote them (not sorted by name: 4 before 11), so a clone without checkpoints
    reports them too."""
    base = tmp_path / "results/cifar10/vgg11_w8/pgd_at"
    for run, (first, second) in {"mrpf-0.9-s0": (6, 3), "uniform_l1-0.9-s0": (3, 5),
                                 "mrpf-0.9-s1": (7, 7)}.items():
        record = json.loads((base / run / "prune.json").read_text())
        record["widths"] = [["net.features.0", first, 8], ["net.features.4", second, 16],
                            ["net.features.11", 2, 32]]
        (base / run / "prune.json").write_text(json.dumps(record))
        assert not (base / run / "checkpoint.pt").exists()
    config = {"grid": "g", "grids": {"g": GRID}}
    reporting.write_report(config, tmp_path / "results", tmp_path / "widths", log=lambda *_: None)
    section = (tmp_path / "widths/summary.md").read_text().split("### Channels kept per group")[1].split("###")[0]
    lines = [x for x in section.splitlines() if x.startswith("|")]
    assert [c.strip() for c in lines[0].split("|")[1:-1]] == ["run", "0", "4", "11", "params"]
    cells = {c[0]: c[1:4] for c in ([c.strip() for c in x.split("|")[1:-1]] for x in lines[2:])}
    assert cells == {"mrpf-0.9-s0": ["6/8", "3/16", "2/32"], "uniform_l1-0.9-s0": ["3/8", "5/16", "2/32"]}


def test_the_strength_joint_search_chose_is_reported_per_step(report, tmp_path):
    """A joint_search run's prune.json candidates become one row: per step the strength with the
    lowest robust loss and every candidate's loss; runs without a search get no row."""
    base = tmp_path / "results/cifar10/vgg11_w8/pgd_at"
    record = json.loads((base / "mrpf-0.9-s0" / "prune.json").read_text())
    losses = [[2.3, 2.2, 2.25], [3.1, 3.2, 3.0]]
    record["steps"] = [dict(record["steps"][0], search=[{"strength": t, "robust_loss": x}
                                                        for t, x in zip((0, 0.5, 1), step)]) for step in losses]
    (base / "mrpf-0.9-s0" / "prune.json").write_text(json.dumps(record))
    reporting.write_report({"grid": "g", "grids": {"g": GRID}}, tmp_path / "results", tmp_path / "search",
                           log=lambda *_: None)
    section = (tmp_path / "search/summary.md").read_text().split("### Strength chosen")[1].split("###")[0]
    rows = [[c.strip() for c in x.split("|")[1:-1]] for x in section.splitlines() if x.startswith("|")][2:]
    assert rows == [["mrpf-0.9-s0", "t = 0.5 (2.300 / 2.200 / 2.250)", "t = 1 (3.100 / 3.200 / 3.000)"]]


def test_a_grid_without_evaluations_draws_a_plot_that_says_so(tmp_path):
    import warnings

    config = {"grid": "g", "grids": {"g": GRID}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rows = reporting.write_report(config, tmp_path / "results", tmp_path / "reports", log=lambda *_: None)
    assert not [w for w in caught if "artists" in str(w.message)]
    assert (tmp_path / "reports/robustness.png").stat().st_size > 0
    assert all(r.get("pgd_acc") is None for r in rows)


def test_untagged_runs_are_also_compared_with_the_control_block(report):
    """control_tag: every untagged method's row over seeds gets a second interval, against the
    uniform_l1 runs of the control block (here uniform_l1 with more fine-tuning epochs)."""
    folder, rows, outcomes = report
    summary = (folder / "summary.md").read_text()
    header = next(x for x in summary.splitlines() if x.startswith("| method ") and "Δ PGD-20 vs uniform_l1 ft8" in x)
    column = [c.strip() for c in header.split("|")].index("Δ PGD-20 vs uniform_l1 ft8")
    mine = np.stack([outcomes[f"mrpf-0.9-s{s}"]["pgd"] for s in (0, 1, 2)])
    control = np.stack([outcomes[f"uniform_l1-0.9-s{s}-ft8"]["pgd"] for s in (0, 1, 2)])
    d = seed_image_difference(mine, control)
    line = next(x for x in summary.splitlines() if x.startswith("| mrpf ") and "| 0,1,2 " in x and "| — " in x)
    assert [c.strip() for c in line.split("|")][column] == (
        f"{100 * d['diff']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] (3 seeds)")


def test_a_control_tag_without_its_uniform_l1_block_is_one_error():
    from mrpf.errors import MrpfError

    config = {"grid": "g", "grids": {"g": dict(GRID, control_tag="ft9")}}
    with pytest.raises(MrpfError, match="control_tag: no extra_runs block with tag 'ft9' prunes uniform_l1"):
        workflow.validate_config(config)
