"""hf-drencoder: differentially private LoRA fine-tuning for the Hugging Face Trainer (DR-Encoder)."""

__version__ = "0.1.0"

from .arguments import DRArgumentsMixin, DRTrainingArguments, private_arguments_class
from .audit import AuditResult, PrivacyAuditError, run_audit
from .callbacks import PrivacyCallback
from .codec import GradientCodec, LayoutMismatchError, LoraLayout, build_prior, collect_gradient_statistics, pretrain_codec
from .federated import FederatedArguments, FederatedSimulation
from .privacy.accounting import PrivacyAccountant, PrivacyBudgetError, compute_epsilon
from .privacy.calibration import calibrate_noise_multiplier
from .recipe import suggest_hyperparameters
from .trainer import DRTrainer, PrivateTrainerMixin, make_private

__all__ = [
    "AuditResult",
    "PrivacyAuditError",
    "run_audit",
    "build_prior",
    "calibrate_noise_multiplier",
    "collect_gradient_statistics",
    "compute_epsilon",
    "DRArgumentsMixin",
    "DRTrainer",
    "DRTrainingArguments",
    "make_private",
    "PrivateTrainerMixin",
    "private_arguments_class",
    "FederatedArguments",
    "FederatedSimulation",
    "GradientCodec",
    "LayoutMismatchError",
    "LoraLayout",
    "pretrain_codec",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "PrivacyCallback",
    "suggest_hyperparameters",
    "__version__",
]
