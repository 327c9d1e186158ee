"""The federated runner: canary parties through the parties' own privatisation and the server's aggregation."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from ..privacy.accounting import compute_epsilon
from .canaries import _CanaryDirections, _Canaries
from .central import _training_history
from .estimator import lower_bound_from_scores
from .result import AuditResult, PrivacyAuditError, comparison_note, verdict



class _RecordingCodec:
    """The server's view of the codec: delegates everything, and keeps the last input of ``decode`` (the latent
    aggregate R / sqrt(E[k]) the server decodes), so canaries can be scored before decoding."""

    def __init__(self, inner, sink: "FederatedCanaries"):
        self._inner, self._sink = inner, sink

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def decode(self, latent, *args, **kwargs):
        self._sink._last_latent = latent.detach().float().reshape(-1).clone()
        return self._inner.decode(latent, *args, **kwargs)


class FederatedCanaries(_Canaries):
    """m canary parties, each included with probability 1/2 (``included``), for one FederatedSimulation run.

    An included canary is a party whose update is a fixed unit direction u_i (in the flat LoRA update space,
    where the parties clip and add noise) scaled to ``scale * max_update_norm``. When it takes part in a
    round it sends what a real party sends: ``encode_message(privatize_update(update, C, sigma, its own
    generator))`` from `hf_drencoder.federated.party` (clipped to C, its own N(0, sigma^2 C^2) noise,
    encoded with the federation's codec). Its message is added to the round's messages before
    ``FederatedServer.aggregate_round`` runs, so it counts in k of R = sum / sqrt(k) like any party.

    Args:
        num_canaries: m.
        sampling: ``every_step`` (an included canary takes part in every round: a party with rate q = 1,
            compared with the client-level accountant at q = 1 for the rounds run) or ``poisson`` (each round
            with the federation's party rate q, like a real party: compared with the reported epsilon).
        observe: ``release`` (the aggregate before decoding: R itself without a codec, the latent aggregate
            with one, scored against the encoded directions) or ``update`` (the decoded update the server
            applies, scored against u_i).
        direction: as in `GradientCanaries`.
        scale: as in `GradientCanaries`.
        seed: sets membership, directions and the Poisson draws (the canaries' noise comes from the
            federation's ``noise_seed``, or OS entropy).
    """

    def __init__(self, num_canaries: int, sampling: str = "every_step", observe: str = "release",
                 direction: str = "random", scale: float = 1.0, seed: int = 0):
        super().__init__(num_canaries, sampling, observe, direction, scale, seed)
        self._last_latent = None

    def attach(self, simulation) -> None:
        """Hook into ``simulation`` (a fresh FederatedSimulation, before ``run()``): sets it up (ledger,
        calibration, codec, server) and wraps its server's ``aggregate_round``."""
        if simulation.round != 0 or simulation.history:
            raise ValueError("audit a fresh federation: rounds already run (or resumed) contain no canary")
        simulation._setup()
        server = simulation.server
        if getattr(server, "_audit_canaries", None) is not None:
            return
        self._sim, self._server = simulation, server
        self._num_parties = server.num_parties
        self._norm = self.scale * float(simulation.args.max_update_norm)
        self._resolve(server.layout.dim)
        self._directions = _CanaryDirections(self.num_canaries, server.layout.dim, self.direction, self._gen)
        if server.codec is not None:
            server.codec = _RecordingCodec(server.codec, self)
        inner = server.aggregate_round

        def aggregate_round(messages, round_index):
            extra = self._messages(round_index)
            target = self._release_directions() if self.observe == "release" else None
            out = inner(list(messages) + extra, round_index)
            self.releases += 1
            self._score(out, target)
            return out

        server.aggregate_round = aggregate_round
        server._audit_canaries = self

    def _messages(self, round_index: int) -> list:
        from ..federated import party as party_module
        from ..federated.server import derive_seed
        from ..privacy.noise import make_generator

        present = torch.as_tensor(self.included)
        if self.sampling == "poisson":
            present = present & (torch.rand(self.num_canaries, generator=self._gen) < self._server.sample_rate)
        idx = torch.nonzero(present).flatten()
        if idx.numel() == 0:
            return []
        server, sim = self._server, self._sim
        updates = self._directions.rows(idx) * self._norm
        out = []
        for i, update in zip(idx.tolist(), updates):
            pid = self._num_parties + i
            # the party's own code path: a bug in clipping, noise or encoding reaches the canaries too
            gen = make_generator("cpu", derive_seed(sim.args.noise_seed, 4, round_index, pid)) if server.dp_enabled else None
            noised = party_module.privatize_update(update, server.max_norm, server.noise_multiplier, gen)
            payload, kind = party_module.encode_message(noised, sim.codec, server.decode_noise_std or None)
            out.append(party_module.PartyMessage(pid, payload, kind))
        return out

    def _release_directions(self) -> torch.Tensor | None:
        """With a codec: the canaries' directions in the latent space (the encoder is linear), unit rows, at
        the codec's current state (the parties encoded with the same state)."""
        codec = self._sim.codec
        if codec is None:
            return None
        enc = codec.encode(self._directions.rows(torch.arange(self.num_canaries)), noise_std=self._server.decode_noise_std or None)
        return enc / enc.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def _score(self, decoded: torch.Tensor, latent_dirs: torch.Tensor | None) -> None:
        server = self._server
        # under DP the server releases y = R / sqrt(E[k]); scale back to R so that scores read in units of C
        unit = math.sqrt(server.expected_parties) if server.dp_enabled else 1.0
        if latent_dirs is not None:
            s = latent_dirs @ (self._last_latent * unit)
        else:
            s = self._directions.project(decoded.detach().float().reshape(-1).cpu() * unit)
        self.scores += s.double().numpy()


def run_federated_audit(
    simulation,
    num_canaries: int = 256,
    canary_sampling: str = "every_step",
    observe: str = "release",
    direction: str = "random",
    canary_scale: float = 1.0,
    confidence: float = 0.95,
    guesses: Sequence[tuple[int, int]] | None = None,
    seed: int = 0,
    check: bool = True,
) -> AuditResult:
    """Run a federation once with canary parties and return the audit's lower bound next to the client-level
    accountant's epsilon (see `FederatedCanaries` for the canaries and what is compared).

    Args:
        simulation: a fresh `FederatedSimulation` built as the user builds
            theirs (model, arguments, codec), or a function of no arguments that returns one. The audit calls
            ``run()``.
        confidence: as in `run_audit`.
        guesses: as in `run_audit`.
        check: as in `run_audit`.
    """
    if not (0 < confidence < 1):
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    sim = simulation() if callable(simulation) else simulation
    canaries = FederatedCanaries(num_canaries, canary_sampling, observe, direction, canary_scale, seed)
    canaries.attach(sim)
    sim.run()
    if canaries.releases == 0:
        raise RuntimeError("no round was aggregated: the canaries took part in nothing")
    report = sim.privacy_report()
    ledger = sim.ledger
    if ledger.disabled:
        eps_canary = eps_reported = math.inf
    else:
        # stage-1 statistics rounds are in the history too (no canary takes part in them)
        stats_rounds = sum(1 for h in sim.history if h.get("stage") == "statistics")
        history = _training_history(ledger, stats_rounds)
        counted = sum(n for _, _, n in history)
        if counted < canaries.releases:
            raise PrivacyAuditError(
                f"the server aggregated {canaries.releases} rounds but the ledger counted {counted}: a round was not accounted"
            )
        if canary_sampling == "every_step":
            history = [(sigma, 1.0, n) for sigma, _, n in history]
        with np.errstate(divide="ignore"):  # opacus' PRV takes log(1 - q) = -inf at q = 1 and handles it
            eps_canary = compute_epsilon(history, ledger.delta, ledger.accountant_name)
        eps_reported = ledger.accountant.epsilon()
    outcome = lower_bound_from_scores(canaries.scores, canaries.included, report["delta"], confidence, guesses)
    passed, message = verdict(outcome.epsilon_lower_bound, eps_canary, confidence)
    num_canaries = canaries.num_canaries
    result = AuditResult(
        canary_type="party", canary_sampling=canary_sampling, observe=observe, num_canaries=num_canaries,
        num_included=int(np.sum(canaries.included)), guesses=outcome.guesses, correct=outcome.correct,
        abstentions=num_canaries - outcome.guesses, k_plus=outcome.k_plus, k_minus=outcome.k_minus,
        candidates_tried=outcome.candidates_tried, confidence=confidence, delta=report["delta"],
        epsilon_lower_bound=outcome.epsilon_lower_bound, epsilon_accountant=eps_canary, epsilon_reported=eps_reported,
        accountant=report["accountant"], noise_multiplier=report["noise_multiplier"], sample_rate=report["sample_rate"],
        steps=canaries.releases, dp_enabled=report["dp_enabled"], passed=passed, message=message,
        comparison=comparison_note("party", canary_sampling, eps_canary, eps_reported, canaries.releases),
        epsilon_lower_bound_eps_delta=outcome.epsilon_lower_bound, report=report,
    )
    if check and not passed:
        raise PrivacyAuditError(message, result)
    return result

