"""The server optimizer: how the decoded aggregate update of a round moves the global adapter.

Each round the server decodes one aggregate update ``Delta`` (the mean party update, noised under DP) and treats
``-Delta`` as the gradient of the flat global adapter ``x`` (the pseudo-gradient of Reddi et al., "Adaptive
Federated Optimization", ICLR 2021):

    fedavg                 x <- x + lr * Delta                        (server_momentum = 0: plain FedAvg)
    fedavg + momentum mu   b <- mu * b + Delta;  x <- x + lr * b      (FedAvgM: torch.optim.SGD)
    fedadam                torch.optim.Adam(lr, betas=(beta1, beta2), eps=tau) on the gradient -Delta

The learning rate of round t (0-based) of R planned rounds follows ``schedule``: ``constant`` (lr every round) or
``linear`` (lr * (R - t) / R: lr in the first round, lr / R in the last), the decay that DP training favours because
the noise of the last rounds is what stays in the final adapter.

Under DP this is post-processing: the optimizer reads only the released aggregates, so it costs no privacy and
the accounting does not change. Its state (momentum buffer, Adam moments and step) is part of a federation
state, so a resumed run continues with it.
"""

from __future__ import annotations

import math

import torch

SERVER_OPTIMIZERS = ("fedavg", "fedadam")
SERVER_LR_SCHEDULES = ("constant", "linear")
STATE_PREFIX = "server_optimizer."


def check_server_optimizer(kind: str, lr: float, momentum: float, betas, tau: float, schedule: str,
                           num_rounds: int | None) -> None:
    """Raise ``ValueError`` naming the setting to change unless these describe a server optimizer that can run.
    ``FederatedArguments`` calls it before any data is read; ``ServerOptimizer`` calls it when built directly."""
    if kind not in SERVER_OPTIMIZERS:
        raise ValueError(f"server_optimizer={kind!r} is unknown: choose one of {', '.join(SERVER_OPTIMIZERS)}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"server_learning_rate={lr} must be a positive finite number")
    if not (0 <= momentum < 1):
        raise ValueError(f"server_momentum={momentum} must be in [0, 1)")
    if schedule not in SERVER_LR_SCHEDULES:
        raise ValueError(f"server_lr_schedule={schedule!r} is unknown: choose one of {', '.join(SERVER_LR_SCHEDULES)}")
    if schedule != "constant" and not (num_rounds is not None and num_rounds >= 1):
        raise ValueError(f"server_lr_schedule={schedule!r} needs the planned number of rounds (num_rounds >= 1)")
    if kind == "fedadam":
        if momentum:
            raise ValueError("server_momentum is fedavg's: fedadam's momentum is server_beta1. Set server_momentum=0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"server_beta1={betas[0]} and server_beta2={betas[1]} must be in [0, 1)")
        if not (tau > 0):
            raise ValueError(f"server_tau={tau} must be > 0")


class ServerOptimizer:
    """A torch optimizer over the flat global adapter, stepped with the negative decoded update as gradient.

    Args:
        kind: ``"fedavg"`` (SGD on the pseudo-gradient, with ``momentum``) or ``"fedadam"`` (Adam).
        lr: the server learning rate.
        momentum: FedAvg's server momentum (0: plain FedAvg, ``x + lr * Delta``).
        betas, tau: FedAdam's moment decays and its adaptivity constant (Adam's ``eps``).
        schedule: ``"constant"`` or ``"linear"`` (decay from ``lr`` to ``lr / num_rounds`` over the planned rounds).
        num_rounds: the planned rounds R (needed by ``"linear"``).
    """

    def __init__(self, kind: str = "fedavg", lr: float = 1.0, momentum: float = 0.0, betas=(0.9, 0.99), tau: float = 1e-3,
                 schedule: str = "constant", num_rounds: int | None = None):
        check_server_optimizer(kind, lr, momentum, betas, tau, schedule, num_rounds)
        self.schedule = schedule
        self.num_rounds = num_rounds
        self.kind = kind
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.betas = (float(betas[0]), float(betas[1]))
        self.tau = float(tau)
        self._param: torch.nn.Parameter | None = None
        self._opt: torch.optim.Optimizer | None = None

    @classmethod
    def from_args(cls, args) -> "ServerOptimizer":
        return cls(args.server_optimizer, args.server_learning_rate, args.server_momentum,
                   (args.server_beta1, args.server_beta2), args.server_tau, args.server_lr_schedule, args.num_rounds)

    def lr_at(self, round_index: int) -> float:
        """The learning rate of round ``round_index`` (0-based). Past the planned rounds (a run extended on resume)
        the linear schedule stays at its last value, ``lr / num_rounds``."""
        if self.schedule == "constant":
            return self.lr
        return self.lr * max(1, self.num_rounds - round_index) / self.num_rounds

    @property
    def is_plain_fedavg(self) -> bool:
        return self.kind == "fedavg" and self.momentum == 0.0

    def _build(self, dim: int) -> None:
        self._param = torch.nn.Parameter(torch.zeros(dim))
        if self.kind == "fedadam":
            self._opt = torch.optim.Adam([self._param], lr=self.lr, betas=self.betas, eps=self.tau, foreach=False)
        else:
            self._opt = torch.optim.SGD([self._param], lr=self.lr, momentum=self.momentum, foreach=False)

    def step(self, current: torch.Tensor, update: torch.Tensor, round_index: int | None = None) -> torch.Tensor:
        """The new flat global adapter from the current one and the decoded update of round ``round_index``
        (0-based; needed unless the schedule is constant)."""
        if round_index is None and self.schedule != "constant":
            raise ValueError(f"server_lr_schedule={self.schedule!r}: step needs the round index")
        lr = self.lr_at(round_index or 0)
        current = current.detach().float()
        update = update.detach().float().reshape(current.shape)
        if self.is_plain_fedavg:
            return current + lr * update  # stateless: exactly the FedAvg step
        if self._param is None:
            self._build(current.numel())
        for group in self._opt.param_groups:
            group["lr"] = lr
        with torch.no_grad():
            self._param.copy_(current)
        self._param.grad = -update
        self._opt.step()
        self._param.grad = None
        return self._param.detach().clone()

    # ---- state: part of a federation state ------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The optimizer's state as named tensors (empty before the first stateful step, and for plain FedAvg)."""
        if self._opt is None:
            return {}
        state = self._opt.state.get(self._param, {})
        return {STATE_PREFIX + k: torch.as_tensor(v).detach().float().reshape(-1).clone() for k, v in state.items()}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor], dim: int) -> None:
        mine = {k[len(STATE_PREFIX):]: v for k, v in tensors.items() if k.startswith(STATE_PREFIX)}
        if not mine:
            return
        self._build(dim)
        state = {k: (v.reshape(()) if k == "step" else v.reshape(dim)) for k, v in mine.items()}
        saved = self._opt.state_dict()
        saved["state"] = {0: state}
        self._opt.load_state_dict(saved)

    def describe(self) -> dict:
        out = {"server_optimizer": self.kind, "server_learning_rate": self.lr, "server_lr_schedule": self.schedule}
        if self.kind == "fedavg":
            out["server_momentum"] = self.momentum
        else:
            out.update(server_beta1=self.betas[0], server_beta2=self.betas[1], server_tau=self.tau)
        return out


__all__ = ["SERVER_LR_SCHEDULES", "SERVER_OPTIMIZERS", "ServerOptimizer"]
