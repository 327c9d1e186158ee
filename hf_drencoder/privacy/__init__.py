"""The privacy mechanics of DR-Encoder: sampling, clipping, noise and accounting, as small pure pieces."""

from .accounting import (
    ACCOUNTANTS,
    PrivacyAccountant,
    PrivacyBudgetError,
    compute_epsilon,
    gdp_epsilon,
    gdp_mu,
)
from .calibration import calibrate_noise_multiplier, max_steps_within_budget
from .clipping import CLIPPING_MODES, clip_and_sum, per_sample_norms
from .grouping import GROUP_INDEX_KEY, GroupIndexCollator, GroupPoissonBatchSampler, group_rows, sum_by_group
from .mechanism import GaussianGradientMechanism
from .noise import gaussian_noise_like, make_generator
from .sampling import EMPTY_BATCH_KEY, EmptyBatchCollator, PoissonBatchSampler

__all__ = [
    "ACCOUNTANTS",
    "CLIPPING_MODES",
    "EMPTY_BATCH_KEY",
    "EmptyBatchCollator",
    "GROUP_INDEX_KEY",
    "GaussianGradientMechanism",
    "GroupIndexCollator",
    "GroupPoissonBatchSampler",
    "PoissonBatchSampler",
    "PrivacyAccountant",
    "PrivacyBudgetError",
    "calibrate_noise_multiplier",
    "clip_and_sum",
    "compute_epsilon",
    "gaussian_noise_like",
    "gdp_epsilon",
    "gdp_mu",
    "group_rows",
    "make_generator",
    "max_steps_within_budget",
    "per_sample_norms",
    "sum_by_group",
]
