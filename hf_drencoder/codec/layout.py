"""The layout of a LoRA gradient: which trainable tensors it has, in which order, and where each one sits in
the flat vector the codec works on.

A codec is trained for one layout and is meaningless on another (its prior says which coordinate carries
which variance), so the layout is recorded in the codec's config and checked before use. Blocks are tied
to parameter names, not to positions in ``model.parameters()``, so that the same LoRA configuration on
the same base model gives the same layout in every process.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

# which LoRA factor a parameter is, read from peft's parameter names
_FACTOR_PATTERNS = (
    ("lora_A", re.compile(r"\.lora_A\.")),
    ("lora_B", re.compile(r"\.lora_B\.")),
    ("lora_embedding_A", re.compile(r"\.lora_embedding_A\.")),
    ("lora_embedding_B", re.compile(r"\.lora_embedding_B\.")),
    ("head", re.compile(r"\.modules_to_save\.")),
)


class LayoutMismatchError(ValueError):
    """A codec was used with a model whose LoRA gradient has a different layout."""


@dataclass(frozen=True)
class Block:
    """One trainable tensor of the LoRA gradient.

    ``module`` is the adapted module (``...layers.0.self_attn.q_proj``), ``factor`` is ``lora_A``,
    ``lora_B``, ``head`` (a ``modules_to_save`` copy) or ``other``; ``offset``/``numel`` locate the tensor
    in the flat vector.
    """

    name: str
    module: str
    factor: str
    shape: tuple[int, ...]
    offset: int
    numel: int

    @property
    def matrix_shape(self) -> tuple[int, int]:
        """The tensor seen as a matrix (rows = first dim, columns = the rest); a vector is one column."""
        if len(self.shape) == 0:
            return (1, 1)
        return (self.shape[0], self.numel // max(self.shape[0], 1))


def _factor_and_module(name: str) -> tuple[str, str]:
    for factor, pattern in _FACTOR_PATTERNS:
        m = pattern.search(name)
        if m:
            return factor, name[: m.start()]
    return "other", name.rsplit(".", 1)[0] if "." in name else name


class LoraLayout:
    """Deterministic map between a list of per-parameter gradients and one flat vector.

    Build it with `from_model` (the trainable parameters of a ``PeftModel``, in ``named_parameters``
    order) or from names and shapes. ``flatten`` and ``unflatten`` are exact inverses.
    """

    def __init__(self, names: Sequence[str], shapes: Sequence[Sequence[int]]):
        if len(names) != len(shapes):
            raise ValueError(f"{len(names)} names but {len(shapes)} shapes")
        if not names:
            raise ValueError("a layout needs at least one trainable tensor; is LoRA applied to the model?")
        if len(set(names)) != len(names):
            raise ValueError("parameter names in a layout must be unique")
        blocks, offset = [], 0
        for name, shape in zip(names, shapes):
            shape = tuple(int(s) for s in shape)
            numel = math.prod(shape)
            factor, module = _factor_and_module(name)
            blocks.append(Block(name, module, factor, shape, offset, numel))
            offset += numel
        self.blocks: tuple[Block, ...] = tuple(blocks)
        self.dim = offset

    # construction -----------------------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: torch.nn.Module) -> "LoraLayout":
        """The layout of ``model``'s trainable parameters (LoRA factors and ``modules_to_save`` heads)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return cls([n for n, _ in named], [tuple(p.shape) for _, p in named])

    def to_dict(self) -> dict:
        return {"names": [b.name for b in self.blocks], "shapes": [list(b.shape) for b in self.blocks]}

    @classmethod
    def from_dict(cls, data: dict) -> "LoraLayout":
        return cls(data["names"], data["shapes"])

    # identity ---------------------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """Short hash of names and shapes: equal fingerprints mean interchangeable layouts."""
        text = json.dumps(self.to_dict(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def __eq__(self, other) -> bool:
        return isinstance(other, LoraLayout) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(self.fingerprint)

    def __len__(self) -> int:
        return len(self.blocks)

    def describe(self) -> str:
        """One line: counts per factor, total size and fingerprint (used in error messages)."""
        counts: dict[str, int] = {}
        for b in self.blocks:
            counts[b.factor] = counts.get(b.factor, 0) + 1
        parts = ", ".join(f"{v} {k}" for k, v in sorted(counts.items()))
        return f"LoraLayout({len(self.blocks)} tensors: {parts}; {self.dim} values; fingerprint {self.fingerprint})"

    def __repr__(self) -> str:
        return self.describe()

    def check_compatible(self, other: "LoraLayout", what: str = "codec", against: str = "model") -> None:
        """Raise `LayoutMismatchError` naming both layouts and the first difference."""
        if self == other:
            return
        mine, theirs = self.to_dict(), other.to_dict()
        detail = ""
        for i, (a, b) in enumerate(zip(zip(mine["names"], mine["shapes"]), zip(theirs["names"], theirs["shapes"]))):
            if a != b:
                detail = (
                    f"; first difference at tensor {i}: {what} has {a[0]} {tuple(a[1])}, {against} has {b[0]} {tuple(b[1])}"
                )
                break
        else:
            detail = f"; {what} has {len(self.blocks)} tensors, {against} has {len(other.blocks)}"
        raise LayoutMismatchError(
            f"the {what} was trained for {self.describe()} but the {against} has {other.describe()}{detail}. "
            "Pre-train a codec for this model and LoRA configuration (hf-drencoder pretrain-codec)."
        )

    # the map ----------------------------------------------------------------------------------------------
    def flatten(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors (in layout order) into one fp32 vector of length ``dim``.

        A leading batch dimension is kept: tensors of shape ``[n, *shape]`` give ``[n, dim]``.
        """
        tensors = list(tensors)
        if len(tensors) != len(self.blocks):
            raise ValueError(f"expected {len(self.blocks)} tensors for {self.describe()}, got {len(tensors)}")
        batched = tensors[0].dim() == len(self.blocks[0].shape) + 1
        parts = []
        for b, t in zip(self.blocks, tensors):
            want = tuple(t.shape[1:]) if batched else tuple(t.shape)
            if want != b.shape:
                raise ValueError(f"tensor for {b.name} has shape {tuple(t.shape)}, layout expects {b.shape}")
            parts.append(t.reshape(t.shape[0], -1).float() if batched else t.reshape(-1).float())
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Inverse of `flatten` (views into ``flat``)."""
        if flat.shape[-1] != self.dim:
            raise ValueError(f"flat vector has {flat.shape[-1]} values, {self.describe()} has {self.dim}")
        lead = tuple(flat.shape[:-1])
        return [flat[..., b.offset : b.offset + b.numel].reshape(*lead, *b.shape) for b in self.blocks]

    def model_grads(self, model: torch.nn.Module) -> torch.Tensor:
        """The flat ``.grad`` of ``model``'s trainable tensors (zeros where a gradient is missing)."""
        params = dict(model.named_parameters())
        out = []
        for b in self.blocks:
            p = params[b.name]
            out.append(p.grad if p.grad is not None else torch.zeros_like(p))
        return self.flatten(out)

    def block_slices(self) -> Iterable[tuple[Block, slice]]:
        for b in self.blocks:
            yield b, slice(b.offset, b.offset + b.numel)


__all__ = ["Block", "LayoutMismatchError", "LoraLayout"]
