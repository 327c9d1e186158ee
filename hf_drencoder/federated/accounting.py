"""Client-level privacy bookkeeping shared by the in-process simulation and the Flower strategy."""

from __future__ import annotations

import math

from ..privacy.accounting import PrivacyBudgetError, compute_epsilon
from ..privacy.ledger import PrivacyLedger

# What depends on who took part in a round, or how many: the sampled set and who answered (k; also k x message
# bytes), the exposure of the busiest party so far, and the round's wall time (it grows with k). The analysis
# keeps the sample secret, so these stay in the server's own state and logs, out of anything written next to the
# model. Everything else in a record is a public constant of the run or a function of the released update.
SERVER_ONLY_KEYS = ("parties", "received", "failed", "num_received", "uplink_bytes", "epsilon_server_view_busiest",
                    "round_time_s")

FIXED_NEIGHBOURING = "replace-one party (the number of parties is public)"
LOCAL_NEIGHBOURING = "zero-out one party's data (local DP at each party; who took part is not hidden from the server)"


def client_level_ledger(args) -> PrivacyLedger:
    """The client-level ledger of a federation with ``args`` (a `FederatedArguments`).

    Poisson party sampling: (sigma, q) per round, add/remove-one party, sensitivity C (docs/federated.md).
    Fixed-size sampling (exactly k of the n parties without replacement): replace-one adjacency (n is public), where
    replacing one party's data moves sum/sqrt(k') by at most 2C (C when its message arrives in only one of the two
    cases), so the accountant gets sigma / 2 for a release on k of n drawn without replacement, which dp-accounting's
    RDP analysis amplifies (``accountant="rdp"``; PRV and PLD have no analysis of this sampling).
    """
    if is_local(args):
        # local DP at the party: each message alone is the Gaussian mechanism clip_C(u) + N(0, sigma^2 C^2) on that
        # party's data, sensitivity C against a zero update; the server knows who answered, so no amplification by
        # sampling (q = 1) and a party may answer in every round (docs/federated.md)
        return PrivacyLedger(
            delta=args.delta, sample_rate=1.0, max_grad_norm=args.max_update_norm, accountant_name=args.accountant,
            noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon, unit="party",
            disabled=args.disable_dp, sensitivity=1.0, neighbouring=LOCAL_NEIGHBOURING,
        )
    if is_fixed_size(args):
        n, k = args.num_parties, int(args.parties_per_round)
        return PrivacyLedger(
            delta=args.delta, sample_rate=k / n, max_grad_norm=args.max_update_norm, accountant_name=args.accountant,
            noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon, unit="party",
            disabled=args.disable_dp, sensitivity=2.0, neighbouring=FIXED_NEIGHBOURING,
            without_replacement=(n, k) if k < n else None,
        )
    return PrivacyLedger(
        delta=args.delta, sample_rate=args.sample_rate, max_grad_norm=args.max_update_norm,
        accountant_name=args.accountant, noise_multiplier=args.noise_multiplier, target_epsilon=args.target_epsilon,
        unit="party", disabled=args.disable_dp, sensitivity=1.0, neighbouring="add/remove one party",
    )


def is_fixed_size(args) -> bool:
    """Whether ``args`` sample exactly ``parties_per_round`` parties without replacement each round."""
    return getattr(args, "party_sampling", "poisson") == "fixed"


def is_local(args) -> bool:
    """Whether ``args`` calibrate each party's noise for its own message alone (``noise_calibration="local"``)."""
    return getattr(args, "noise_calibration", "distributed") == "local"


def accounting_rate(args) -> float:
    """The Poisson rate the accountant is given for a party's releases: q, or 1 without amplification (local DP).
    Fixed-size sampling has no Poisson rate: its releases are recorded as samples without replacement."""
    if is_fixed_size(args) and not is_local(args):
        raise ValueError("fixed-size party sampling is accounted as sampling without replacement, not at a Poisson rate")
    return 1.0 if is_local(args) else args.sample_rate


def public_history(history: list[dict]) -> list[dict]:
    """``history`` without anything that depends on who took part in each round, or how many (see
    ``SERVER_ONLY_KEYS``): what may be written next to the model."""
    return [{k: v for k, v in rec.items() if k not in SERVER_ONLY_KEYS} for rec in history]


def trust_report(args) -> dict:
    """What the privacy report says about the trust the reported epsilon needs (docs/federated.md)."""
    if is_local(args):
        return {
            "noise_calibration": "local",
            "trust": "none: each party's message alone is a Gaussian mechanism with sensitivity C on its data "
                     "(local DP at the party, accounted at q = 1 over every round, no amplification)",
        }
    shares = int(getattr(args, "noise_shares", 1))
    trust = ("every sampled party adds its noise (the server cannot check it) and the sampled set stays secret; "
             "the epsilon is amplified by party sampling. Against the server: epsilon_server_view")
    if shares > 1:
        trust += (f". noise_shares={shares}: each message carries 1/{shares} of the aggregate's noise variance and the "
                  f"server adds the missing shares when fewer than {shares} parties answer, so the epsilon also relies "
                  "on the server doing so; one message alone is private only at party_noise_multiplier (use secure "
                  "aggregation, or a server you trust with the messages)")
    return {"noise_calibration": "distributed", "trust": trust}


def aggregation_report(args, sigma: float | None) -> dict:
    """How the aggregate is formed and what each message carries (docs/federated.md, "Noise shares")."""
    from .server import aggregate_sensitivity

    m = int(getattr(args, "noise_shares", 1))
    h = aggregate_sensitivity(m)
    party = None if sigma is None or args.disable_dp else sigma * h / math.sqrt(m)
    if m == 1:
        text = "R = sum of locally noised messages / sqrt(k); update = decode(R / sqrt(q N))"
    else:
        text = (f"each party adds 1/{m} of the noise variance; R = (sum of messages + the server's top-up to {m} "
                f"parties' noise when fewer arrive) * sqrt({m} / max(k, {m})); update = decode(R / sqrt({m} q N))")
    return {"aggregation": text, "noise_shares": m, "aggregate_sensitivity": h * args.max_update_norm,
            "party_noise_multiplier": party}


def account_codec_prior(ledger: PrivacyLedger, codec, local: bool = False) -> None:
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
        if local:
            # the prior's releases are re-accounted without amplification, like every release of a local run
            history = [(sigma, 1.0, steps) for sigma, _, steps in history]
        elif ledger.neighbouring == FIXED_NEIGHBOURING:
            # replace-one adjacency (fixed-size sampling): a Poisson release's add/remove analysis does not apply; the
            # release itself, without amplification, is a Gaussian mechanism whose replace-one sensitivity is twice its
            # add/remove one (the triangle inequality)
            history = [(sigma / 2, 1.0, steps) for sigma, _, steps in history]
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


def server_view_bound(stats_rounds: int, rounds: int, sigma: float, z: float, delta: float, cache=None) -> float:
    """The public counterpart of `server_view_epsilon`: epsilon against the server of a party that sent a
    message in every one of ``stats_rounds`` statistics and ``rounds`` training rounds. It bounds every party's
    exposure and depends on no sample (the exposure of the busiest actual party would tell whether anyone took
    part; it stays in the server's state)."""
    if rounds == 0 and stats_rounds == 0:
        return 0.0
    return server_view_epsilon([rounds], [stats_rounds], sigma, z, delta, cache)


__all__ = ["FIXED_NEIGHBOURING", "LOCAL_NEIGHBOURING", "SERVER_ONLY_KEYS", "account_codec_prior", "accounting_rate",
           "client_level_ledger", "is_fixed_size", "is_local", "public_history", "server_view_bound", "server_view_epsilon", "trust_report"]
