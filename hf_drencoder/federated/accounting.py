"""Client-level privacy bookkeeping shared by the in-process simulation and the Flower strategy."""

from __future__ import annotations

import math

from ..privacy.accounting import PrivacyBudgetError, compute_epsilon
from ..privacy.ledger import PrivacyLedger

# Who took part in a round, and how many (k; also k x message bytes): the analysis keeps these secret, so they
# stay in the server's own state and out of any history written next to the model.
SERVER_ONLY_KEYS = ("parties", "received", "failed", "num_received", "uplink_bytes")


def client_level_ledger(args) -> PrivacyLedger:
    """The client-level ledger of a federation with ``args`` (a :class:`FederatedArguments`).

    Poisson party sampling: (sigma, q) per round, add/remove-one party, sensitivity C (docs/federated.md).
    Fixed-size sampling (exactly k parties without replacement): no analysis of amplification by that sampling
    is implemented here, so each round is accounted as the Gaussian mechanism it is without sampling (q = 1),
    under replace-one adjacency, where replacing one party's data moves sum/sqrt(k) by at most 2C (and by at
    most C when it fails instead): the accountant gets sigma / 2.
    """
    fixed = args.party_sampling == "fixed"
    return PrivacyLedger(
        delta=args.delta, sample_rate=1.0 if fixed else args.sample_rate, max_grad_norm=args.max_update_norm,
        accountant_name=args.accountant, noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
        unit="party", disabled=args.disable_dp, sensitivity=2.0 if fixed else 1.0,
        neighbouring="replace-one party" if fixed else "add/remove one party",
    )


def public_history(history: list[dict]) -> list[dict]:
    """``history`` without who took part in each round and how many (see ``SERVER_ONLY_KEYS``)."""
    return [{k: v for k, v in rec.items() if k not in SERVER_ONLY_KEYS} for rec in history]


def account_codec_prior(ledger: PrivacyLedger, codec) -> None:
    """A ready codec's prior was built from data: add its party-level cost to ``ledger``, or refuse the codec."""
    if ledger.disabled or codec is None:
        return
    info, history = codec.stage1_privacy, codec.stage1_history
    if history is None:
        raise PrivacyBudgetError(
            "the codec does not record what its prior cost (stage1_privacy is unknown): a prior fitted to the "
            "parties' data would leak it through the decoder. Use codec='auto' (stage 1 from the parties, "
            "accounted here), a codec saved by a federation, or codec.mark_public(reason) if its prior depends on "
            "no private data"
        )
    if history and info.get("unit", "example") != "party":
        raise PrivacyBudgetError(
            f"the codec's prior was released with an {info.get('unit')!r}-level guarantee, which does not bound "
            "what it reveals about a whole party: use codec='auto' (party-level stage 1) or a public codec"
        )
    if history:
        ledger.record_prior_releases(history, source="codec stage 1")


def server_view_epsilon(participation, stats_participation, sigma: float, z: float, delta: float, cache=None) -> float:
    """epsilon of the most exposed party against an adversary who reads every message (the server): each
    message is a Gaussian mechanism with its own multiplier (sigma for training rounds, z for stage-1
    statistics), no amplification by sampling. Without subsampling, Gaussian mechanisms compose exactly to
    mu-GDP with mu^2 = sum(steps / sigma^2), so this is exact (``gdp`` at q = 1) whatever the run's accountant.
    ``participation`` / ``stats_participation``: messages sent per party; ``cache``: an optional dict."""
    cache = {} if cache is None else cache
    pairs = set(zip(list(stats_participation), list(participation)))
    best = 0.0
    for s, r in pairs:
        dominated = any(s2 >= s and r2 >= r and (s2, r2) != (s, r) for s2, r2 in pairs)
        if dominated or (s, r) == (0, 0):
            continue
        key = (s, r, sigma, z, delta)
        if key not in cache:
            hist = [h for h in ((z, 1.0, s), (sigma, 1.0, r)) if h[2] > 0]
            cache[key] = compute_epsilon(hist, delta, "gdp")
        best = max(best, cache[key])
    return best if math.isfinite(best) else math.inf


__all__ = ["SERVER_ONLY_KEYS", "account_codec_prior", "client_level_ledger", "public_history", "server_view_epsilon"]
