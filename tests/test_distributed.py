"""Data-parallel DP: 2 processes (gloo) under `accelerate launch` with the shipped examples/accelerate_config.yaml."""

import os
import socket
import subprocess
import sys

import pytest
import torch

from conftest import dr_args, make_lm_dataset, make_tiny_llama
from hf_drencoder import DRTrainer
from hf_drencoder.privacy import compute_epsilon
from hf_drencoder.privacy.sampling import PoissonBatchSampler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIGMA, C, GLOBAL_BATCH, N = 2.0, 0.5, 8, 64


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ROOT, "examples", "accelerate_config.yaml"),
        "--main_process_port", str(_free_port()), os.path.join(ROOT, "tests", "dist_worker.py"), str(out),
        str(GLOBAL_BATCH // 2),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


def test_sampler_shares_make_one_global_poisson_batch():
    single = list(PoissonBatchSampler(1000, 0.05, steps_per_epoch=20, micro_batches=2, seed=3))
    shares = [list(PoissonBatchSampler(1000, 0.05, 20, 2, seed=3, num_replicas=3, rank=r)) for r in range(3)]
    for i, batch in enumerate(single):
        parts = [s[i] for s in shares]
        assert sorted(sum(parts, [])) == sorted(batch)  # a partition of the global draw ...
        assert all(not set(a) & set(b) for j, a in enumerate(parts) for b in parts[j + 1 :])  # ... with no overlap


def test_ranks_stay_identical_and_the_global_noise_is_one_draw(two_ranks):
    r0, r1 = two_ranks
    assert r0["train"]["world_size"] == 2
    for run in ("zero", "train"):
        assert torch.equal(r0[run]["released"], r1[run]["released"])
        for name, value in r0[run]["lora"].items():
            assert torch.equal(value, r1[run]["lora"][name]), name
    # zero signal: what is released is noise / B_global, drawn once for the whole job (std sigma C / B_global;
    # each rank adding its own full draw would give sqrt(2) times that)
    noise = r0["zero"]["released"]
    assert noise.std().item() == pytest.approx(SIGMA * C / GLOBAL_BATCH, rel=0.05)
    # with signal the adapter trained (and stayed identical on both ranks, above)
    assert any(v.abs().sum() > 0 for v in r0["train"]["lora"].values())


def test_epsilon_equals_the_single_process_run(two_ranks, tmp_path):
    r0, r1 = two_ranks
    q = GLOBAL_BATCH / N
    assert r0["train"]["history"] == r1["train"]["history"] == [(SIGMA, q, 4)]
    assert r0["train"]["resumed_history"] == r1["train"]["resumed_history"] == [(SIGMA, q, 4)]
    single = DRTrainer(
        model=make_tiny_llama(), train_dataset=make_lm_dataset(n=N),
        args=dr_args(tmp_path, noise_multiplier=SIGMA, per_sample_max_grad_norm=C,
                     per_device_train_batch_size=GLOBAL_BATCH, max_steps=4),
    )
    single.train()
    assert single.ledger.accountant.history == [(SIGMA, q, 4)]
    for key in ("epsilon", "epsilon_rdp", "epsilon_prv", "mu_gdp"):
        assert r0["train"]["epsilon"][key] == pytest.approx(single.ledger.metrics()[key])
    assert r0["train"]["epsilon"]["epsilon_rdp"] == pytest.approx(compute_epsilon([(SIGMA, q, 4)], 1 / N, "rdp"))


def test_processes_holding_different_rows_are_refused(two_ranks):
    # one rank's copy shuffled: without the check, steps would use some rows twice (sensitivity 2C)
    for rank in two_ranks:
        assert rank["mismatch_error"] is not None and "same dataset in the same order" in rank["mismatch_error"]


def test_a_launch_the_arguments_do_not_see_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="use_cpu=True"):
        DRTrainer(model=make_tiny_llama(), args=dr_args(tmp_path), train_dataset=make_lm_dataset())
