"""The private step: what every private trainer composes.

It takes per-example losses and gives the released gradient (DESIGN.md section 2):

    per-example losses -> backward -> per-sample LoRA gradients (opacus hooks) -> [latent: encode] -> clip each to C
    -> sum over the step's physical batches -> + N(0, sigma^2 C^2) once -> / expected batch
    -> [codec: decode] -> [post-processing hooks] -> param.grad

It knows nothing about Trainer: a trainer calls `backward` for each physical batch of a step and `release` once
per optimizer step, and the ledger counts the release before any noise is drawn.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from .privacy.grouping import sum_by_group
from .privacy.ledger import PrivacyLedger
from .privacy.mechanism import GaussianGradientMechanism
from .privacy.per_sample import attach_grad_sample_hooks, pop_per_sample_gradients
from .safeguards import first_non_finite, gradient_hook_problems


class PrivateStep:
    """Per-example losses in, the privatised gradient out (written to the parameters' ``.grad``).

    Args:
        params: the trainable adapter tensors (the only gradients that are released).
        ledger: counts each release (and refuses one the budget does not allow).
        mechanism: the Gaussian mechanism that clips, sums and noises.
        dp: False for the non-private baseline through the same path (no clipping, no noise).
        codec: a ``GradientCodec`` or None; ``latent`` puts clipping and noise in its latent space.
        decode_noise_std: the per-coordinate noise std of the released mean (what the decoder is told).
        post_hooks: post-processing of the released gradient (costs no privacy), run in order.
        all_reduce: data parallel: sums a list of tensors over processes (after the main process's noise).
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        ledger: PrivacyLedger,
        mechanism: GaussianGradientMechanism,
        *,
        dp: bool = True,
        codec=None,
        layout=None,
        latent: bool = False,
        decode_noise_std: float = 0.0,
        post_hooks: list[Callable[[list[torch.Tensor]], list[torch.Tensor]]] | None = None,
        all_reduce=None,
    ):
        self.params = params
        self.ledger = ledger
        self.mechanism = mechanism
        self.dp = dp
        self.codec = codec
        self.layout = layout
        self.latent = latent and codec is not None
        self.decode_noise_std = decode_noise_std
        self.post_hooks = post_hooks if post_hooks is not None else []
        self.all_reduce = all_reduce
        self.hooks = None
        self._group_sums: list[torch.Tensor] | None = None
        self._model: torch.nn.Module | None = None

    # ---- lifetime ----

    def attach(self, model: torch.nn.Module) -> None:
        """opacus hooks on ``model``'s submodules, not a wrapper: a ``PeftModel`` stays what saving expects."""
        self._model = model
        if self.dp and self.hooks is None:
            self.hooks = attach_grad_sample_hooks(model)

    def detach(self) -> None:
        if self.hooks is not None:
            self.hooks.cleanup()
            self.hooks = None
        for p in self.params:
            p.grad_sample = None

    # ---- one step ----

    def check(self, step: int) -> None:
        """Before touching a step's data: nothing may act on a raw gradient during backward, and the adapter must
        still be finite (a non-finite adapter would train on silently and be shared as if it were a model)."""
        problems = gradient_hook_problems(self.params)
        if problems:
            raise ValueError("DRTrainer cannot guarantee privacy: " + problems[0])
        if self._model is not None:
            released = {id(p) for p in self.params}
            thawed = [n for n, p in self._model.named_parameters() if p.requires_grad and id(p) not in released]
            if thawed:
                raise RuntimeError(
                    f"{thawed[0]} became trainable after training started (a callback, a checkpoint load?): its "
                    "gradient would be computed raw, without clipping or noise, and an optimizer over all parameters "
                    "would apply it. Keep the trainable parameters fixed during training (with lora_freeze_a, keep "
                    "the LoRA A factors frozen)"
                )
        if first_non_finite([p.detach() for p in self.params]) is not None:
            raise FloatingPointError(
                f"the adapter is not finite after step {step - 1}: lower the learning rate, check warmup and weight "
                "decay, or use fp32 instead of bf16"
            )

    def backward(self, losses: torch.Tensor, step: int, check_finite: bool = True, group_index=None,
                 num_groups: int | None = None) -> torch.Tensor:
        """Backward of one physical batch's per-example losses ``[b]``; its clipped gradients join the step's sum.
        With ``group_index`` (the group of each row of the model's batch within its micro-batch of ``num_groups``
        groups; as many rows as losses, or more when a loss covers several rows, as a preference pair's two) the
        rows' gradients are summed per group, and the groups are clipped in `end_micro_batch`. Returns the sum of
        the losses (for logging)."""
        if check_finite and first_non_finite([losses.detach()]) is not None:
            raise FloatingPointError(
                f"step {step}: an example's loss is not finite (NaN or inf). Check the inputs and labels (e.g. a row "
                "whose labels are all -100 in a custom loss), the learning rate, and bf16 overflow"
            )
        with warnings.catch_warnings():
            # torch warns that the first hooked LoRA layer's input needs no grad (the base is frozen): expected
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses.sum().backward()
        self._collect(losses.shape[0] if group_index is None else group_index.shape[0], group_index, num_groups)
        return losses.detach().float().sum()

    def end_micro_batch(self) -> None:
        """Clip the micro-batch's per-group sums (privacy unit 'group'): a group is clipped once, as one example,
        even when its rows ran in several physical pieces."""
        if self._group_sums is not None:
            sums, self._group_sums = self._group_sums, None
            self._add_per_unit(sums)

    def _add_per_unit(self, grads: list[torch.Tensor]) -> None:
        if self.latent:
            # the encoder is a fixed linear map (public prior + released history): clipping the latents
            # bounds each unit's influence on the released latent by C
            grads = [self.codec.encode(self.layout.flatten(grads), self.decode_noise_std)]
        self.mechanism.add_per_sample(grads)

    def _collect(self, batch: int, group_index=None, num_groups: int | None = None) -> None:
        """Move this batch's gradients into the mechanism and wipe them from the parameters, so that a raw
        gradient is never left where the optimizer or a logger could read it."""
        if self.dp:
            grads = pop_per_sample_gradients(self.params, batch)
            if group_index is not None:
                self._group_sums = sum_by_group(grads, group_index, num_groups=num_groups, out=self._group_sums)
                return
            self._add_per_unit(grads)
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        if self.latent:
            grads = [self.codec.encode(self.layout.flatten(grads), 0.0)]
        self.mechanism.add_summed(grads)
        for p in self.params:
            p.grad = None

    def release(self, step: int) -> list[torch.Tensor]:
        """The step's privatised mean gradient, decoded and post-processed, written to ``param.grad``."""
        if self._group_sums is not None:
            raise RuntimeError("end_micro_batch() was not called before release(): per-group sums are unclipped")
        # Count first: a release the budget does not allow is refused before any noise is drawn or used.
        self.ledger.record_step()
        grads = self.mechanism.release(all_reduce=self.all_reduce)
        if self.latent:
            decoded = self.codec.decode(grads[0], self.decode_noise_std)
            self.codec.observe(decoded)  # the temporal state follows released (decoded) gradients only
            grads = self.layout.unflatten(decoded)
        elif self.codec is not None:
            # the encoder sees the noised mean only: encoding and decoding are post-processing
            grads = self.codec.roundtrip(grads, noise_std=self.decode_noise_std)
        for hook in self.post_hooks:
            grads = hook(grads)  # post-processing of an already private gradient: costs no privacy
        if first_non_finite(grads) is not None:
            # the step is already counted: epsilon covers it, and the non-finite release is never applied
            raise FloatingPointError(
                f"step {step}: the released gradient is not finite (NaN or inf); it was not applied. Check the "
                "inputs and labels, the learning rate, and bf16 overflow"
            )
        for p, g in zip(self.params, grads):
            p.grad = g.to(p.dtype)
        return grads


__all__ = ["PrivateStep"]
