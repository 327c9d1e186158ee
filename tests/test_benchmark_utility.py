"""benchmarks/utility.py: federated population runs filed under their target epsilon, the learning rate picked on the
held-out seeds."""

import argparse
import json
import os

import pytest

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


@pytest.fixture
def utility(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import utility

    monkeypatch.setattr(utility, "results_path", lambda quick: str(tmp_path / "utility.json"))
    return utility


def _population_row(name, target, spent, seed=0, noise_shares=100):
    return dict(name=name, split="test", epsilon=spent, target_epsilon=target, seed=seed, local_lr=5e-3,
                accuracy=0.8, macro_f1=0.3, delta=1e-3, noise_multiplier=1.0, uplink_bytes_per_party=100,
                parties=1000, per_round=100, rounds_run=40, noise_shares=noise_shares, example_visits=1000,
                wall_s=1.0)


def test_federated_rows_keep_their_target_epsilon(utility, tmp_path):
    rows = [_population_row("population-eps1-s0", 1.0, 0.99), _population_row("population-eps3-s1", 3.0, 2.98, seed=1),
            _population_row("population-eps8-s0", 8.0, 7.97), _population_row("population-nodp-s0", None, None),
            _population_row("population-eps8-shares1-s0", 8.0, 7.97, noise_shares=1),
            dict(_population_row("population-tune-slr5", 8.0, 7.9), split="tune")]
    results = tmp_path / "federated_defaults.json"
    results.write_text(json.dumps({"rows": rows}))
    utility.run_federated(argparse.Namespace(quick=False, federated_results=str(results)))
    runs = {r["source"]: r for r in utility.load(str(tmp_path / "utility.json"))["runs"]}
    assert set(runs) == {"population-eps1-s0", "population-eps3-s1", "population-eps8-s0", "population-nodp-s0",
                         "population-eps8-shares1-s0"}  # the held-out tuning row is not a result
    assert runs["population-eps1-s0"]["target_epsilon"] == 1.0
    assert runs["population-eps3-s1"]["target_epsilon"] == 3.0 and runs["population-eps3-s1"]["seed"] == 1
    assert runs["population-eps8-s0"]["target_epsilon"] == 8.0
    assert runs["population-nodp-s0"]["target_epsilon"] is None and runs["population-nodp-s0"]["method"] == "fedavg"
    assert runs["population-eps8-s0"]["method"] == "dp-fedavg"
    assert runs["population-eps8-shares1-s0"]["method"] == "dp-fedavg-shares1"


def test_the_chosen_rate_is_the_best_mean_over_tuning_seeds(utility):
    def run(lr, seed, acc, f1=0.5, split="272x80"):
        return dict(stage="tune", model="cut", split=split, method="lora", lr=lr, seed=seed, accuracy=acc, macro_f1=f1)

    # 2e-2 has the single best run, 1e-2 the best mean over its three seeds
    runs = [run(1e-2, 0, 0.94), run(1e-2, 1, 0.94), run(1e-2, 2, 0.94),
            run(2e-2, 0, 0.95), run(2e-2, 1, 0.90), run(2e-2, 2, 0.91), run(5e-2, 0, 0.99, split="544x40")]
    assert utility.chosen_lr({"runs": runs}, "cut", "lora", "272x80") == 1e-2
    # one seed per rate: the best run; equal accuracy: macro-F1 decides
    assert utility.chosen_lr({"runs": [run(1e-2, 0, 0.9, 0.6), run(2e-2, 0, 0.9, 0.7)]}, "cut", "lora", "272x80") == 2e-2
    with pytest.raises(SystemExit, match="no tuning runs"):
        utility.chosen_lr({"runs": runs}, "cut", "dp-ffa", "272x80")


def test_the_parameter_average_is_a_moving_average_of_the_steps_swapped_in_at_the_end(utility):
    import torch

    model = torch.nn.Linear(2, 1)
    model.bias.requires_grad_(False)  # only trainable parameters are averaged
    ema = utility.parameter_ema(0.9)
    for value in (1.0, 3.0, 5.0):  # the parameters after three optimizer steps
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(value)
        ema.on_step_end(None, None, None, model=model)
    ema.swap_in(model)
    # from the first step's parameters: 0.9 (0.9 * 1 + 0.1 * 3) + 0.1 * 5
    assert torch.allclose(model.weight, torch.full((1, 2), 0.9 * (0.9 + 0.3) + 0.5))
    assert torch.equal(model.bias, torch.full((1,), 5.0))


def test_a_method_s_schedule_replaces_the_recipe_s(utility):
    # both the recipe and the method name the schedule: the method's wins (and the arguments are built once)
    assert utility.METHODS["dp-ffa-linear"]["lr_scheduler_type"] == "linear"
    hp = {"lr_scheduler_type": "constant", "learning_rate": 1e-2}
    spec = dict(utility.METHODS["dp-ffa-linear"])
    utility.method_hyperparameters(hp, spec)
    assert hp["lr_scheduler_type"] == "linear" and "lr_scheduler_type" not in spec and spec["lora_freeze_a"] is True


def test_tune_without_methods_runs_only_the_headline_methods(utility, monkeypatch):
    # the options (dp-ffa-linear, lora-ema, ...) are tuned only when named: the default grid stays the headline one
    planned = []
    monkeypatch.setattr(utility, "_data", lambda model, quick: "data")
    monkeypatch.setattr(utility, "train_eval", lambda model, method, *a, **k: planned.append(method) or
                        dict(accuracy=0.5, macro_f1=0.1, epsilon=None, wall_s=0.0))
    monkeypatch.setattr(utility, "add_run", lambda run, path: None)
    utility.main(["tune", "--lrs", "5e-2"])
    assert planned == list(utility.HEADLINE_METHODS) == ["lora", "dp-lora", "dp-ffa"]
    planned.clear()
    utility.main(["tune", "--lrs", "5e-2", "--methods", "dp-ffa-ema"])
    assert planned == ["dp-ffa-ema"]


def test_iterate_average_rows_keep_the_decays_they_asked_for(monkeypatch):
    """federated_defaults.py files the scores of its moving averages under ``ema_results``: the row's ``ema`` stays
    the decays its spec asked for, and the report prints one score per decay."""
    monkeypatch.syspath_prepend(BENCHMARKS)
    import federated_defaults

    with open(os.path.join(BENCHMARKS, "results", "federated_defaults.json")) as f:
        rows = [r for r in json.load(f)["rows"] if "ema" in r]
    specs = {s["name"]: s for plan in federated_defaults.PLANS.values() for s in plan}
    assert rows, "the committed results hold iterate-average rows"
    for r in rows:
        assert isinstance(r["ema"], list) and [f"{d:g}" for d in r["ema"]] == list(r["ema_results"])
        assert tuple(specs[r["name"]]["ema"]) == tuple(r["ema"])
        line = federated_defaults._diagnostics(r)
        assert all(f"{d:g}:{r['ema_results'][f'{d:g}']['accuracy']:.4f}" in line for d in r["ema"])


def test_the_clipping_only_diagnostic_runs_at_its_own_noise_and_no_target(utility, monkeypatch):
    """``dp-ffa-clip-only`` fixes a small noise multiplier: it is planned with no target epsilon (its epsilon is not
    a budget), and a private method without either a target or a noise multiplier of its own is refused."""
    planned, train_eval = [], utility.train_eval
    monkeypatch.setattr(utility, "_data", lambda model, quick: "data")
    monkeypatch.setattr(utility, "train_eval", lambda model, method, eps, *a, **k: planned.append((method, eps)) or
                        dict(accuracy=0.5, macro_f1=0.1, epsilon=None, wall_s=0.0))
    monkeypatch.setattr(utility, "add_run", lambda run, path: None)
    utility.main(["tune", "--lrs", "5e-2", "--methods", "dp-ffa-clip-only", "dp-ffa", "ffa"])
    assert planned == [("dp-ffa-clip-only", None), ("dp-ffa", utility.TUNE_EPSILON), ("ffa", None)]
    data = ({"tune": (None, None)}, None, 8, 100)
    with pytest.raises(ValueError, match="target epsilon or a fixed noise multiplier"):
        train_eval("cut", "dp-ffa", None, 5e-2, 0, "tune", data, quick=True)
    with pytest.raises(ValueError, match="target epsilon or a fixed noise multiplier"):
        train_eval("cut", "dp-ffa-clip-only", 8.0, 5e-2, 0, "tune", data, quick=True)
