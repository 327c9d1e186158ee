"""FederatedArguments: the settings of a federated simulation, parseable by ``HfArgumentParser``."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..privacy.accounting import ACCOUNTANTS, check_accountant
from .partition import PARTITIONS
from .server_optimizer import SERVER_LR_SCHEDULES, SERVER_OPTIMIZERS, check_server_optimizer

PARTY_SAMPLING = ("poisson", "fixed")
NOISE_CALIBRATIONS = ("distributed", "local")
LOCAL_OPTIMIZERS = ("sgd", "adamw")
# the server learning rate when none is given, per server optimizer
DEFAULT_SERVER_LEARNING_RATE = {"fedavg": 1.0, "fedadam": 1e-2}
FEDADAM_DEFAULTS = {"server_beta1": 0.9, "server_beta2": 0.99, "server_tau": 1e-3}


@dataclass
class FederatedArguments:
    """Arguments of `FederatedSimulation`.

    Privacy (the unit protected is one PARTY, i.e. all rows of one party's dataset):
        target_epsilon / noise_multiplier: exactly one (or ``disable_dp``). With ``target_epsilon`` the noise
            multiplier is solved for ``num_rounds`` rounds (after any stage-1 statistics rounds) and the run
            stops before the budget is exceeded.
        target_delta: default 1 / num_parties; larger values are refused.
        max_update_norm: C, the L2 bound on each party's update (local adapter - global adapter), flat over
            all trainable LoRA tensors.
        party_sampling: ``poisson`` (each party joins a round independently with rate q, the default) or
            ``fixed`` (exactly ``parties_per_round`` parties drawn without replacement). ``fixed`` is analysed under
            replace-one adjacency (sensitivity 2C, the number of parties public): each round is a sample of k of n
            without replacement with multiplier sigma / 2, accounted by dp-accounting's RDP bound for that sampling,
            so it needs ``accountant="rdp"`` (docs/federated.md). Costlier in epsilon than Poisson.
        parties_per_round: parties per round (expected, with poisson); q = parties_per_round / num_parties.
        noise_calibration: ``distributed`` (the default) calibrates each party's noise for the aggregate: the
            epsilon reported is amplified by party sampling and relies on every sampled party adding its noise
            (the server cannot check a message's noise). ``local`` calibrates each party's noise for its own
            message alone (local DP at the party): accounted at q = 1 over every round, with no amplification,
            so a party's guarantee does not depend on the server or on any other party (docs/federated.md).

        noise_shares: m (default 1). Each sampled party adds 1/m of the aggregate's noise variance; the server
            adds the shares of missing parties below m and scales by sqrt(m / max(k, m)), so the aggregate's noise
            is the same whoever answers. m about q N cuts the model's noise by about sqrt(m) / 1.5 at the same
            epsilon; one message alone is then private only at ``party_noise_multiplier`` (docs/federated.md).

    Each sampled party adds its own noise N(0, sigma^2 C^2 I) before anything leaves it (noise_shares = 1); the
    server sums the messages it receives and divides by sqrt(number received). docs/federated.md has the argument.

    Optimization (none of it changes the accounting):
        local_optimizer / local_learning_rate / local_steps / local_batch_size: each sampled party's training
            from the global adapter (default 10 AdamW steps of 16 rows at lr 5e-3, measured in
            benchmarks/federated_defaults.py).
        server_optimizer: how the decoded aggregate update moves the global adapter: ``fedavg`` (``+=
            server_learning_rate x update``, with ``server_momentum`` for FedAvgM) or ``fedadam`` (Adam on the
            pseudo-gradient ``-update`` with ``server_beta1``, ``server_beta2`` and ``server_tau`` as Adam's eps).
            ``server_lr_schedule="linear"`` decays the server learning rate over the planned rounds.
            It reads only the released aggregate: post-processing, no privacy cost.
    """

    output_dir: str = field(default="federated_output", metadata={"help": "Where the history, the adapter, the privacy report and resumable states go."})
    num_parties: int = field(default=100, metadata={"help": "Number of parties the training set is split into."})
    partition: str = field(default="iid", metadata={"help": "iid; dirichlet (non-IID by the label column: each class divided among parties); dirichlet_equal_size (every party the same size, its own Dirichlet label mix: for thousands of small parties).", "choices": list(PARTITIONS)})
    dirichlet_alpha: float = field(default=0.5, metadata={"help": "Concentration of the Dirichlet split: small = each party has few classes."})
    label_column: str | None = field(default=None, metadata={"help": "Column the Dirichlet split is made by (default: labels, else label)."})
    partition_seed: int = field(default=0, metadata={"help": "Seed of the split of the data among parties."})
    num_rounds: int = field(default=30, metadata={"help": "Training rounds planned (the noise is calibrated for them)."})
    party_sampling: str = field(default="poisson", metadata={"help": "poisson: each party joins a round with rate q. fixed: exactly parties_per_round parties without replacement, accounted under replace-one adjacency (sensitivity 2C) by dp-accounting's RDP bound for sampling without replacement; needs accountant=rdp (see docs/federated.md).", "choices": list(PARTY_SAMPLING)})
    noise_calibration: str = field(default="distributed", metadata={"help": "distributed: each party's noise is calibrated for the aggregate sum/sqrt(k); the epsilon is amplified by party sampling and holds only if every sampled party adds its noise, which the server cannot check (see docs/federated.md, trust model). local: each party's noise is calibrated for its own message alone (local DP at the party, accounted at q = 1 with no amplification); a party's guarantee then depends on no one else, at the price of far more noise for the same epsilon.", "choices": list(NOISE_CALIBRATIONS)})
    noise_shares: int = field(default=1, metadata={"help": "m: each sampled party adds 1/m of the aggregate's noise variance, and the server adds the missing shares when fewer than m answer, so the released aggregate always carries its full noise. 1 (default): every message alone carries the full noise (private at sigma even against the server), and the model gets sqrt(q N) times more noise than a central mechanism. About q N (the expected parties per round): about sqrt(m)/1.5 times less noise on the model at the same epsilon, but one message alone is private only at party_noise_multiplier = 1.5 sigma / sqrt(m) or so (epsilon_server_view): use it with secure aggregation or a server you trust with the messages. Poisson sampling and distributed calibration only (docs/federated.md)."})
    parties_per_round: float = field(default=10.0, metadata={"help": "Expected parties per round; the sampling rate is q = parties_per_round / num_parties."})
    parallel_parties: int = field(default=1, metadata={"help": "Simulation only: train this many sampled parties' local steps in one batched forward and backward pass (each party keeps its own copy of the adapter, its own rows and its own optimizer state; the updates are those of one party at a time). Much faster for many parties with few rows each; refused for models or collators whose rows influence each other (BatchNorm, packing). 1: one party at a time."})
    local_steps: int = field(default=10, metadata={"help": "Optimizer steps each sampled party runs on its own data per round."})
    local_batch_size: int = field(default=16, metadata={"help": "Batch size of the local steps."})
    local_learning_rate: float = field(default=5e-3, metadata={"help": "Learning rate of the local steps (the default suits adamw; sgd wants about 10x more)."})
    local_optimizer: str = field(default="adamw", metadata={"help": "adamw (the default) or sgd; a fresh optimizer state each round.", "choices": list(LOCAL_OPTIMIZERS)})
    server_optimizer: str = field(default="fedavg", metadata={"help": "How the decoded aggregate update moves the global adapter: fedavg (x += lr * update, with optional server_momentum) or fedadam (server-side Adam on the pseudo-gradient -update, Reddi et al.). Post-processing of the released aggregate: no privacy cost.", "choices": list(SERVER_OPTIMIZERS)})
    server_learning_rate: float | None = field(default=None, metadata={"help": "Server learning rate. Default: 1 for fedavg, 0.01 for fedadam."})
    server_momentum: float = field(default=0.0, metadata={"help": "Server momentum of fedavg (FedAvgM); 0 is plain FedAvg."})
    server_lr_schedule: str = field(default="constant", metadata={"help": "Server learning rate over the planned rounds: constant, or linear (from server_learning_rate in the first round to server_learning_rate / num_rounds in the last). Post-processing: no privacy cost.", "choices": list(SERVER_LR_SCHEDULES)})
    server_beta1: float = field(default=0.9, metadata={"help": "fedadam: decay of the first moment."})
    server_beta2: float = field(default=0.99, metadata={"help": "fedadam: decay of the second moment."})
    server_tau: float = field(default=1e-3, metadata={"help": "fedadam: adaptivity constant tau (Adam's eps)."})
    max_update_norm: float = field(default=1.0, metadata={"help": "C: each party's update is clipped to L2 norm <= C (the client-level sensitivity)."})
    target_epsilon: float | None = field(default=None, metadata={"help": "Client-level budget epsilon. Set exactly one of target_epsilon and noise_multiplier."})
    noise_multiplier: float | None = field(default=None, metadata={"help": "Noise std of each party's message as a multiple of max_update_norm."})
    target_delta: float | None = field(default=None, metadata={"help": "delta of the guarantee; default 1/num_parties, larger values are refused."})
    accountant: str = field(default="prv", metadata={"help": "Accountant for calibration, the budget stop and the headline epsilon: prv, pld or rdp (upper bounds; party_sampling=fixed needs rdp); GDP is logged as information.", "choices": list(ACCOUNTANTS)})
    disable_dp: bool = field(default=False, metadata={"help": "Non-private FedAvg through the same code path (no clipping, no noise, epsilon = inf)."})
    codec: str | None = field(default=None, metadata={"help": "A codec folder or Hub id, 'subspace' (a subspace that follows training: no stage 1, no privacy cost), or 'auto' (stage 1 from the parties). Default: send the noised update itself."})
    codec_latent_ratio: float = field(default=1 / 64, metadata={"help": "Latent size over update size for codec='auto' or 'subspace'."})
    codec_prior: str = field(default="lowrank", metadata={"help": "Prior for codec='auto': paper, element or lowrank.", "choices": ["paper", "element", "lowrank"]})
    stats_rounds: int = field(default=2, metadata={"help": "Stage-1 statistics rounds for codec='auto' (each one accounted at rate q)."})
    stats_noise_multiplier: float = field(default=2.0, metadata={"help": "Noise multiplier of the stage-1 statistics release (per party, local)."})
    eval_every: int = field(default=5, metadata={"help": "Evaluate every this many rounds (and after the last); 0: only after the last."})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "Batch size of evaluation."})
    save_every: int = field(default=0, metadata={"help": "Save a resumable federation state every this many rounds (0: only at the end)."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A federation state folder to continue from."})
    seed: int = field(default=0, metadata={"help": "Seed of local batch order and of model-side randomness."})
    sampling_seed: int | None = field(default=None, metadata={"help": "Seed of the party sampling. Default: OS entropy (the sample must stay secret for amplification); set it for reproducible runs."})
    noise_seed: int | None = field(default=None, metadata={"help": "Seed of the noise (in a simulation: every party's; under Flower: the server's own draw only, each party seeds itself from its own node config). Default: OS entropy. Seeded noise is reproducible noise: for tests only."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bar over rounds."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank when the model is not a PeftModel and no peft_config is given."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha for the default LoRA config."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout for the default LoRA config."})
    lora_target_modules: list[str] | None = field(default=None, metadata={"help": "Modules to adapt for the default LoRA config."})
    lora_freeze_a: bool = field(default=False, metadata={"help": "FFA-LoRA: the LoRA A factors stay at their initialisation (the same for every party: the simulation's one model); only B and the head are trained, clipped, noised and sent. Saved with the federation state and the adapter. FederatedSimulation only (refused on Flower)."})

    def __post_init__(self):
        self.validate()

    @property
    def sample_rate(self) -> float:
        return self.parties_per_round / self.num_parties

    @property
    def delta(self) -> float:
        return self.target_delta if self.target_delta is not None else 1.0 / self.num_parties

    def validate(self) -> None:
        """Refuse settings under which the guarantee cannot hold or is undefined (before any training)."""
        self._validate_server_optimizer()
        if self.num_parties < 1:
            raise ValueError(f"num_parties must be >= 1, got {self.num_parties}")
        if not (0 < self.parties_per_round <= self.num_parties):
            raise ValueError(f"parties_per_round must be in (0, num_parties={self.num_parties}], got {self.parties_per_round}")
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition={self.partition!r} is unknown: choose one of {', '.join(PARTITIONS)}")
        check_accountant(self.accountant)  # prv or rdp: GDP is not an upper bound for q < 1
        if self.local_optimizer not in LOCAL_OPTIMIZERS:
            raise ValueError(f"local_optimizer={self.local_optimizer!r} is unknown: choose one of {', '.join(LOCAL_OPTIMIZERS)}")
        if self.num_rounds < 1 or self.local_steps < 1 or self.local_batch_size < 1:
            raise ValueError("num_rounds, local_steps and local_batch_size must be >= 1")
        if self.stats_rounds < 0:
            raise ValueError(f"stats_rounds must be >= 0, got {self.stats_rounds}")
        if self.party_sampling not in PARTY_SAMPLING:
            raise ValueError(f"party_sampling={self.party_sampling!r} is unknown: choose one of {', '.join(PARTY_SAMPLING)}")
        if self.noise_calibration not in NOISE_CALIBRATIONS:
            raise ValueError(f"noise_calibration={self.noise_calibration!r} is unknown: choose one of {', '.join(NOISE_CALIBRATIONS)}")
        if self.parallel_parties < 1:
            raise ValueError(f"parallel_parties must be >= 1, got {self.parallel_parties}")
        if int(self.noise_shares) != self.noise_shares or self.noise_shares < 1:
            raise ValueError(f"noise_shares must be a whole number >= 1, got {self.noise_shares}")
        if self.noise_shares > 1 and self.noise_calibration == "local":
            raise ValueError("noise_shares > 1 splits the aggregate's noise among the parties, but noise_calibration='local' "
                             "means each message alone carries its full noise: use noise_shares=1, or distributed calibration")
        if self.noise_shares > 1 and self.party_sampling == "fixed":
            raise ValueError("noise_shares > 1 is analysed for Poisson party sampling only: use party_sampling='poisson', "
                             "or noise_shares=1")
        if self.party_sampling == "fixed":
            if self.parties_per_round != int(self.parties_per_round):
                raise ValueError(f"party_sampling='fixed' needs a whole parties_per_round, got {self.parties_per_round}")
            if self.noise_calibration == "distributed" and self.parties_per_round < self.num_parties and not self.disable_dp:
                # the rounds are samples without replacement: only accountants with that analysis may count them
                check_accountant(self.accountant, without_replacement=True)
            if self.codec == "auto":
                raise ValueError(
                    "codec='auto' runs stage-1 statistics rounds, which are accounted for Poisson sampling only: use "
                    "party_sampling='poisson', or a ready codec"
                )
        if self.target_delta is not None and not (0 < self.target_delta < 1):
            raise ValueError(f"target_delta={self.target_delta} must be in (0, 1)")
        if self.disable_dp:
            return
        if self.delta > 1.0 / self.num_parties:
            raise ValueError(
                f"target_delta={self.delta:.3g} is above 1/num_parties = {1.0 / self.num_parties:.3g}: such a delta allows "
                "publishing one party's data outright. Use target_delta <= 1/num_parties (the default)"
            )
        if (self.target_epsilon is None) == (self.noise_multiplier is None):
            which = "both" if self.target_epsilon is not None else "neither"
            raise ValueError(
                f"set exactly one of target_epsilon and noise_multiplier ({which} is set), or disable_dp=True for a "
                "non-private run"
            )
        if self.target_epsilon is not None and not (self.target_epsilon > 0 and math.isfinite(self.target_epsilon)):
            raise ValueError(f"target_epsilon={self.target_epsilon} must be a positive finite number")
        if self.noise_multiplier is not None and not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise ValueError(f"noise_multiplier={self.noise_multiplier} must be positive (0 would be no privacy: use disable_dp)")
        if not (self.max_update_norm > 0 and math.isfinite(self.max_update_norm)):
            raise ValueError(f"max_update_norm={self.max_update_norm} must be a positive finite number (it is the sensitivity)")
        if self.codec == "auto" and self.stats_rounds > 0 and not (self.stats_noise_multiplier > 0):
            raise ValueError("stats_noise_multiplier must be > 0 under DP")

    def _validate_server_optimizer(self) -> None:
        if self.server_optimizer in SERVER_OPTIMIZERS and self.server_learning_rate is None:
            self.server_learning_rate = DEFAULT_SERVER_LEARNING_RATE[self.server_optimizer]
        check_server_optimizer(self.server_optimizer, self.server_learning_rate, self.server_momentum,
                               (self.server_beta1, self.server_beta2), self.server_tau, self.server_lr_schedule,
                               self.num_rounds)
        if self.server_optimizer != "fedadam":
            changed = [k for k, v in FEDADAM_DEFAULTS.items() if getattr(self, k) != v]
            if changed:
                raise ValueError(f"{', '.join(changed)} {'is' if len(changed) == 1 else 'are'} used by server_optimizer="
                                 f"'fedadam' only (this run uses {self.server_optimizer!r}): set server_optimizer='fedadam' "
                                 "or leave them at their defaults")


__all__ = ["DEFAULT_SERVER_LEARNING_RATE", "FederatedArguments", "LOCAL_OPTIMIZERS", "NOISE_CALIBRATIONS", "PARTY_SAMPLING"]
