"""hf-drencoder: differentially private LoRA fine-tuning for the Hugging Face Trainer (DR-Encoder)."""

__version__ = "0.1.0"

from .arguments import DRTrainingArguments
from .callbacks import PrivacyCallback
from .privacy.accounting import PrivacyAccountant, PrivacyBudgetError, calibrate_noise_multiplier, compute_epsilon
from .trainer import DRTrainer

__all__ = [
    "DRTrainer",
    "DRTrainingArguments",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "PrivacyCallback",
    "__version__",
    "calibrate_noise_multiplier",
    "compute_epsilon",
]
