"""PrivacyCallback: the budget stop and the privacy state in checkpoints."""

from __future__ import annotations

import json
import logging
import os

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .privacy.accounting import PrivacyBudgetError
from .privacy.ledger import PrivacyLedger

logger = logging.getLogger(__name__)

PRIVACY_STATE_NAME = "dr_privacy_state.json"
CODEC_DIR = "codec"


def load_privacy_state(checkpoint_dir: str) -> dict:
    """The privacy state a checkpoint recorded. A checkpoint without one is refused: the epsilon already
    spent would be unknown, and resuming from zero would under-report it."""
    path = os.path.join(checkpoint_dir, PRIVACY_STATE_NAME)
    if not os.path.isfile(path):
        raise PrivacyBudgetError(
            f"{checkpoint_dir} has no {PRIVACY_STATE_NAME}: the privacy spent before it is unknown, so resuming "
            "from it would under-report epsilon. Resume from a checkpoint written by DRTrainer, or start afresh"
        )
    with open(path) as f:
        return json.load(f)


class PrivacyCallback(TrainerCallback):
    """Installed by DRTrainer. It stops training before a step that would exceed ``target_epsilon`` and
    writes the accountant history into every checkpoint (``DRTrainer.save_model`` writes the codec there). (The privacy metrics are added to the logs by
    ``DRTrainer.log`` so that every ``report_to`` backend receives them.)"""

    def __init__(self, ledger: PrivacyLedger, planned_steps: int):
        self.ledger = ledger
        self.planned_steps = planned_steps

    def on_train_begin(self, args, state, control, **kwargs):
        # The noise was calibrated for planned_steps; a different count would make the budget wrong.
        if state.max_steps != self.planned_steps and not self.ledger.disabled:
            raise PrivacyBudgetError(
                f"Trainer planned {state.max_steps} optimizer steps but the noise was calibrated for "
                f"{self.planned_steps}; refusing to train with a mis-calibrated budget"
            )
        if self.ledger.steps < state.global_step and not self.ledger.disabled:
            raise PrivacyBudgetError(
                f"the restored privacy history counts {self.ledger.steps} steps but the checkpoint is at step "
                f"{state.global_step}: the accounting would under-report epsilon"
            )
        self._check_budget(state, control)

    def on_step_end(self, args, state, control, **kwargs):
        self._check_budget(state, control)

    def _check_budget(self, state, control):
        if not self.ledger.budget_allows_step():
            control.should_training_stop = True
            if state.global_step >= state.max_steps:
                return  # the plan ends here anyway
            logger.warning(
                "Stopping at step %d: one more step would exceed target_epsilon=%s (epsilon spent: %.4f).",
                state.global_step, self.ledger.target_epsilon, self.ledger.metrics()["epsilon"],
            )

    def on_save(self, args, state, control, **kwargs):
        if not args.should_save:
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise PrivacyBudgetError(f"checkpoint folder {folder} not found: cannot record the privacy state in it")
        with open(os.path.join(folder, PRIVACY_STATE_NAME), "w") as f:
            json.dump({"ledger": self.ledger.state_dict(), "report": self.ledger.report()}, f, indent=2)
