"""The ``hf-drencoder`` command: jobs that are not a user's own training script.

Every subcommand accepts its flags with underscores or dashes (``--noise_multiplier`` or ``--noise-multiplier``),
prints its own usage (``hf-drencoder demo --help``), and turns a configuration error (a bad value, a missing
file, a refused setting) into one line ``hf-drencoder COMMAND: error: ...`` on stderr with exit code 2; give
``--debug`` (before or after the command) for the traceback. JSON it writes is standard JSON: an infinite
epsilon is ``null``, listed under ``"non_finite"``.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import traceback

PROG = "hf-drencoder"
DEBUG_ENV = "HF_DRENCODER_DEBUG"

# What a user can fix by changing the command line or the files it names. Anything else (a RuntimeError during
# training, say) is a bug and keeps its traceback.
CONFIG_ERRORS = (ValueError, OSError, ImportError)


class ConfigError(ValueError):
    """A command-line setting that cannot be run as given."""


def flags(name: str) -> list[str]:
    """``["--a-b", "--a_b"]`` for ``"--a-b"`` (or ``"--a_b"``): both spellings of one long option."""
    body = name.lstrip("-")
    dash, under = "--" + body.replace("_", "-"), "--" + body.replace("-", "_")
    return [dash] if dash == under else [dash, under]


def given(argv: list[str], name: str) -> bool:
    """Whether option ``name`` (either spelling) appears in ``argv``."""
    names = set(flags(name))
    return any(a in names or a.split("=", 1)[0] in names for a in argv)


def _epsilon(argv: list[str]) -> None:
    from . import _jsonio
    from .privacy.accounting import REPORTED_ACCOUNTANTS, compute_epsilon, gdp_mu

    p = argparse.ArgumentParser(prog=f"{PROG} epsilon",
                                description="epsilon of T Poisson-subsampled Gaussian releases under every accountant. "
                                            "Prints JSON; an unbounded epsilon is null (listed under non_finite).")
    p.add_argument(*flags("--noise_multiplier"), dest="noise_multiplier", type=float, required=True,
                   help="sigma: noise std over the clipping norm (> 0)")
    p.add_argument(*flags("--sample_rate"), dest="sample_rate", type=float, required=True,
                   help="q: Poisson sampling rate, in (0, 1]")
    p.add_argument("--steps", type=int, required=True, help="T: number of releases (>= 0)")
    p.add_argument("--delta", type=float, required=True, help="delta, in (0, 1)")
    a = p.parse_args(argv)
    if not (a.noise_multiplier > 0 and math.isfinite(a.noise_multiplier)):
        raise ConfigError(f"--noise_multiplier must be positive and finite, got {a.noise_multiplier}")
    if not (0 < a.sample_rate <= 1):
        raise ConfigError(f"--sample_rate must be in (0, 1], got {a.sample_rate}")
    if a.steps < 0:
        raise ConfigError(f"--steps must be >= 0, got {a.steps}")
    if not (0 < a.delta < 1):
        raise ConfigError(f"--delta must be in (0, 1), got {a.delta}")
    history = [(a.noise_multiplier, a.sample_rate, a.steps)]
    out = {f"epsilon_{name}": compute_epsilon(history, a.delta, name) for name in REPORTED_ACCOUNTANTS}
    out["mu_gdp"] = gdp_mu(history)
    print(_jsonio.dumps(out))


def _demo(argv: list[str]) -> None:
    from .demo import main as demo_main

    demo_main(argv)


def _pretrain_codec(argv: list[str]) -> None:
    from .codec.cli import main as codec_main

    codec_main(["pretrain-codec", *argv])


def _federated(argv: list[str]) -> None:
    from .federated.cli import main as federated_main

    federated_main(argv)


def _audit(argv: list[str]) -> None:
    from .audit import main as audit_main

    # progress bars by default, as in every other command (an explicit --disable_tqdm wins)
    if not given(argv, "--disable_tqdm"):
        argv = ["--disable_tqdm", "false", *argv]
    audit_main(argv)


COMMANDS = {
    "audit": (_audit, "empirical privacy audit: a lower bound on epsilon from canaries, checked against the accountant"),
    "demo": (_demo, "fine-tune the embedded MiniLM + LoRA privately on Reuters-R8; print accuracy and epsilon"),
    "epsilon": (_epsilon, "epsilon under RDP, PRV, PLD and GDP for a noise multiplier, sample rate and number of steps"),
    "federated": (_federated, "federated simulation with client-level DP on the embedded MiniLM + Reuters-R8"),
    "pretrain-codec": (_pretrain_codec, "stage 1: pre-train a gradient codec from private statistics"),
}


def usage() -> str:
    lines = [f"  {name:<16}{help_}" for name, (_, help_) in COMMANDS.items()]
    return (f"usage: {PROG} [--debug] COMMAND [args]  (COMMAND --help for its arguments)\n\ncommands:\n"
            + "\n".join(lines)
            + "\n\n--debug (or HF_DRENCODER_DEBUG=1) shows the traceback of a configuration error.")


def _pop_debug(argv: list[str]) -> tuple[list[str], bool]:
    """Remove our ``--debug`` switch. A ``--debug VALUE`` after the command is left alone: it is Trainer's own
    ``debug`` option (e.g. ``--debug underflow_overflow``)."""
    debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
    out = []
    for i, arg in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--debug" and (not out or nxt is None or nxt.startswith("-")):
            debug = True
            continue
        out.append(arg)
    return out, debug


@contextlib.contextmanager
def _program_name(prog: str):
    """argparse names the program after ``sys.argv[0]`` when a parser is given no ``prog``: make that the command."""
    saved = sys.argv[0] if sys.argv else None
    if sys.argv:
        sys.argv[0] = prog
    try:
        yield
    finally:
        if saved is not None:
            sys.argv[0] = saved


def _one_line(message: str, prog: str) -> str:
    message = " ".join(str(message).split())
    for prefix in (f"{prog}: error: ", f"{prog}: ", f"{PROG}: "):
        if message.startswith(prefix):
            message = message[len(prefix):]
    return message


def _fail(prog: str, message: str, debug: bool) -> None:
    hint = "" if debug else " (run with --debug for the traceback)"
    print(f"{prog}: error: {_one_line(message, prog)}{hint}", file=sys.stderr)
    raise SystemExit(2)


def run_command(name: str, argv: list[str], debug: bool = False):
    """Run subcommand ``name`` with ``argv``; configuration errors become one ``error:`` line and exit code 2."""
    prog = f"{PROG} {name}"
    fn = COMMANDS[name][0]
    try:
        with _program_name(prog):
            return fn(argv)
    except SystemExit as e:
        if isinstance(e.code, str):  # a refusal raised as SystemExit("message")
            if debug:
                traceback.print_exc()
            _fail(prog, e.code, debug)
        raise
    except CONFIG_ERRORS as e:
        if debug:
            traceback.print_exc()
        what = "" if isinstance(e, (ConfigError,)) or type(e) in (ValueError, OSError) else f"{type(e).__name__}: "
        _fail(prog, f"{what}{e}", debug)


def main(argv: list[str] | None = None) -> None:
    argv, debug = _pop_debug(list(sys.argv[1:] if argv is None else argv))
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0)
    if argv and argv[0] == "--version":
        from . import __version__

        print(f"{PROG} {__version__}")
        raise SystemExit(0)
    if not argv:
        print(usage(), file=sys.stderr)
        print(f"{PROG}: error: a command is required", file=sys.stderr)
        raise SystemExit(2)
    if argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        print(f"{PROG}: error: unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})", file=sys.stderr)
        raise SystemExit(2)
    return run_command(argv[0], argv[1:], debug=debug)


if __name__ == "__main__":
    main()
