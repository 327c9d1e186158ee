"""The ``hf-drencoder`` command: jobs that are not a user's own training script."""

from __future__ import annotations

import argparse
import json
import sys


def _epsilon(argv: list[str]) -> None:
    from .privacy.accounting import ACCOUNTANTS, compute_epsilon, gdp_mu

    p = argparse.ArgumentParser(prog="hf-drencoder epsilon", description="epsilon of T subsampled Gaussian releases")
    p.add_argument("--noise_multiplier", type=float, required=True)
    p.add_argument("--sample_rate", type=float, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--delta", type=float, required=True)
    a = p.parse_args(argv)
    history = [(a.noise_multiplier, a.sample_rate, a.steps)]
    out = {f"epsilon_{name}": compute_epsilon(history, a.delta, name) for name in ACCOUNTANTS}
    out["mu_gdp"] = gdp_mu(history)
    print(json.dumps(out, indent=2))


def _demo(argv: list[str]) -> None:
    from .demo import main as demo_main

    demo_main(argv)


def _pretrain_codec(argv: list[str]) -> None:
    try:
        from .codec.cli import add_pretrain_codec_parser, run_pretrain_codec
    except ImportError as e:  # the codec package is optional until it lands
        raise SystemExit(f"pretrain-codec is not available: {e}") from None
    p = argparse.ArgumentParser(prog="hf-drencoder")
    sub = p.add_subparsers(dest="command", required=True)
    add_pretrain_codec_parser(sub)
    run_pretrain_codec(p.parse_args(["pretrain-codec", *argv]))


def _federated(argv: list[str]) -> None:
    from .federated.cli import main as federated_main

    federated_main(argv)


def _audit(argv: list[str]) -> None:
    from .audit import main as audit_main

    audit_main(argv)


COMMANDS = {
    "audit": (_audit, "empirical privacy audit: a lower bound on epsilon from canaries, checked against the accountant"),
    "demo": (_demo, "fine-tune the embedded MiniLM + LoRA privately on Reuters-R8; print accuracy and epsilon"),
    "epsilon": (_epsilon, "epsilon under RDP, PRV and GDP for a noise multiplier, sample rate and number of steps"),
    "federated": (_federated, "federated simulation with client-level DP on the embedded MiniLM + Reuters-R8"),
    "pretrain-codec": (_pretrain_codec, "stage 1: pre-train a gradient codec from private statistics"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-drencoder COMMAND [args]  (COMMAND --help for its arguments)\n\ncommands:\n" + "\n".join(lines))
        raise SystemExit(0 if argv and argv[0] in ("-h", "--help") else 2)
    COMMANDS[argv[0]][0](argv[1:])


if __name__ == "__main__":
    main()
