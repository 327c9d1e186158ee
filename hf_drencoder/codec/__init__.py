"""Stage 1 of DR-Encoder: private gradient statistics, priors built from them, and the gradient codec
pre-trained on prior samples (never on real gradients).

Reading order: `.layout` (gradient <-> flat vector), `.statistics` (the private release),
`.priors` (what the server builds from it), `.codec` (the codec: `.measurement` encodes, `.decoder` decodes,
`.temporal` carries the state across steps), `.subspace` (a codec whose subspace follows training), `.baselines` (compressors to compare against),
`.pretrain` (training on synthetic samples), `.cli` (``hf-drencoder pretrain-codec``).
"""

from .codec import DECODERS, GradientCodec, latent_size
from .layout import Block, LayoutMismatchError, LoraLayout
from .loading import CodecLoadError, load_codec
from .pretrain import pretrain_codec
from .priors import PRIORS, GaussianPrior, build_prior
from .subspace import SubspaceCodec
from .statistics import (
    PARTS,
    GradientStatistics,
    StatisticsAccumulator,
    collect_gradient_statistics,
    part_noise_std,
    statistics_sensitivity,
)

__all__ = [
    "Block",
    "CodecLoadError",
    "DECODERS",
    "GaussianPrior",
    "GradientCodec",
    "GradientStatistics",
    "LayoutMismatchError",
    "LoraLayout",
    "PARTS",
    "PRIORS",
    "StatisticsAccumulator",
    "SubspaceCodec",
    "build_prior",
    "collect_gradient_statistics",
    "latent_size",
    "load_codec",
    "part_noise_std",
    "pretrain_codec",
    "statistics_sensitivity",
]
