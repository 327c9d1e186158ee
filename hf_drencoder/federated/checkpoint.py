"""Saving and resuming a federation (`FederatedSimulation.save_state`, ``resume_from_checkpoint``): the global adapter,
the accountant's history, the round, the codec with its state, the server optimizer's state and who took part, and
the fingerprint a resumed run must match. The sampling seed is never saved."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import torch

from ..callbacks import CODEC_DIR  # the codec's folder, as in a DRTrainer checkpoint
from ..codec.loading import load_codec
from ..lora import is_lora_a_factor
from ..privacy.accounting import PrivacyBudgetError

logger = logging.getLogger("hf_drencoder.federated.simulation")  # the server's log, as the rest of the simulation (docs/federated.md)

STATE_NAME = "federation_state.json"
ADAPTER_NAME = "global_adapter.safetensors"
FROZEN_PREFIX = "frozen."  # FFA-LoRA's frozen A factors, saved next to the global adapter


class FederationCheckpointMixin:
    """The checkpoint half of `FederatedSimulation` (it uses the simulation's args, ledger, codec and adapter)."""

    def _fingerprint(self) -> dict:
        a = self.args
        return {"num_parties": a.num_parties, "sample_rate": a.sample_rate, "max_update_norm": a.max_update_norm,
                "partition_sizes": self.partition_sizes, "layout": self.layout.fingerprint, "disable_dp": a.disable_dp,
                "codec": self.codec is not None, "noise_calibration": a.noise_calibration, "noise_shares": a.noise_shares,
                "lora_freeze_a": a.lora_freeze_a, **self.server_optimizer.describe()}

    def _frozen_factors(self) -> dict:
        """The frozen LoRA A factors of FFA-LoRA (``lora_freeze_a``), by parameter name: not part of the global
        adapter's flat vector, but B was trained against them, so a resumed run must use these exact tensors."""
        if not self.args.lora_freeze_a:
            return {}
        return {n: p for n, p in self.model.named_parameters() if is_lora_a_factor(n)}

    def save_state(self, folder: str) -> None:
        """A resumable federation state: global adapter, accountant, round, codec, seeds, participation."""
        from safetensors.torch import save_file

        os.makedirs(folder, exist_ok=True)
        frozen = {FROZEN_PREFIX + n: p.detach().cpu().contiguous() for n, p in self._frozen_factors().items()}
        save_file({"global": self._global_flat().contiguous(), **self.server_optimizer.state_tensors(), **frozen},
                  os.path.join(folder, ADAPTER_NAME))
        if self.codec is not None:
            self.codec.save_pretrained(os.path.join(folder, CODEC_DIR))
        state = {
            # no sampling seed: with it, anyone holding the state could recompute who took part in every round
            "round": self.round, "ledger": self.ledger.state_dict(),
            "noise_seed": self.args.noise_seed, "participation": self.participation.tolist(),
            "stats_participation": self.stats_participation.tolist(), "history": self.history,
            "fingerprint": self._fingerprint(), "report": self.ledger.report(),
        }
        with open(os.path.join(folder, STATE_NAME), "w") as f:
            json.dump(state, f, indent=2)

    def _load_state(self, folder: str) -> None:
        from safetensors.torch import load_file

        path = os.path.join(folder, STATE_NAME)
        if not os.path.isfile(path):
            raise PrivacyBudgetError(f"{folder} has no {STATE_NAME}: the privacy spent before it is unknown; resume from a "
                                     "folder written by FederatedSimulation.save_state")
        with open(path) as f:
            state = json.load(f)
        has_codec = os.path.isdir(os.path.join(folder, CODEC_DIR))
        if has_codec != (self.codec_spec is not None):
            raise ValueError(f"the saved federation {'has' if has_codec else 'has no'} codec but this run asks for "
                             f"codec={self.codec_spec!r}: resume with the same codec setting")
        if has_codec:
            self.codec = load_codec(os.path.join(folder, CODEC_DIR), self.model)
        mine, saved = self._fingerprint(), state["fingerprint"]
        # states written before these options existed
        saved = {"noise_calibration": "distributed", "server_optimizer": "fedavg", "server_momentum": 0.0, "noise_shares": 1,
                 "server_lr_schedule": "constant",
                 "lora_freeze_a": False, **saved}
        if "server_learning_rate" not in saved:
            saved["server_learning_rate"] = mine["server_learning_rate"]
        diff = [k for k in mine if mine[k] != saved.get(k)]
        if diff:
            raise ValueError(f"the saved federation differs from this run in {diff}: resume with the same parties, "
                             "sampling rate, clipping norm, noise calibration and shares, server optimizer, model and LoRA "
                             "configuration (lora_freeze_a included)")
        tensors = load_file(os.path.join(folder, ADAPTER_NAME))
        frozen = self._frozen_factors()
        missing = [n for n in frozen if FROZEN_PREFIX + n not in tensors]
        if missing:
            raise ValueError(f"the saved federation has no frozen LoRA A factor {missing[0]}: it cannot be resumed with "
                             "lora_freeze_a=True")
        self.ledger.load_state_dict(state["ledger"])
        self.round = int(state["round"])
        # a resumed run samples its remaining rounds from a fresh secret seed (or args.sampling_seed)
        if state.get("noise_seed") != self.args.noise_seed:
            logger.warning("resuming with noise_seed=%s (the state was written with %s)", self.args.noise_seed, state.get("noise_seed"))
        self.participation = np.asarray(state["participation"], dtype=np.int64)
        self.stats_participation = np.asarray(state["stats_participation"], dtype=np.int64)
        self.history = list(state["history"])
        with torch.no_grad():  # the A that B was trained against, whatever this run's model was initialised with
            for n, p in frozen.items():
                p.copy_(tensors[FROZEN_PREFIX + n].to(device=p.device, dtype=p.dtype))
        self._set_global(tensors["global"])
        self.server_optimizer.load_state_tensors(tensors, self.layout.dim)
        logger.warning("resumed the federation from %s at round %d (epsilon spent %.4g)", folder, self.round,
                       self.ledger.metrics()["epsilon"])


__all__ = ["ADAPTER_NAME", "CODEC_DIR", "STATE_NAME", "FederationCheckpointMixin"]
