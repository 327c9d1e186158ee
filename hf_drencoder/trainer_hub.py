"""Saving and sharing a privately trained adapter: ``privacy_report.json``, the codec, and a model card carrying
the privacy report; ``push_to_hub`` refuses a model whose noise can be regenerated."""

from __future__ import annotations

import json
import os

from .callbacks import CODEC_DIR
from .privacy.accounting import PrivacyBudgetError
from .safeguards import PRIVACY_REPORT_NAME


class _HubMixin:
    """Saving, cards and the Hub for `PrivateTrainerMixin`."""

    def push_to_hub(self, *args, allow_seeded_noise: bool = False, **kwargs):
        """Trainer's ``push_to_hub`` (adapter, codec, card, privacy report). A model trained with a fixed
        ``noise_seed`` is refused: whoever knows the seed can regenerate the noise and the batches and remove the
        noise from the adapter. ``allow_seeded_noise=True`` pushes it anyway (for a test repository only)."""
        if self.dp_enabled and self._noise_seed is not None and not allow_seeded_noise:
            raise PrivacyBudgetError(
                "this model was trained with a fixed noise_seed, so its noise can be regenerated and removed: it must "
                "not be shared. Train again without noise_seed (fresh OS entropy) to push it, or pass "
                "allow_seeded_noise=True if the repository is a test"
            )
        return super().push_to_hub(*args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Trainer's save (the adapter), then ``privacy_report.json``, the model card ``README.md`` carrying the
        privacy report, and the gradient codec (``codec/``) when one is used."""
        super().save_model(output_dir, _internal_call)
        if not self.args.should_save:
            return
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.ledger is not None:
            report = self.privacy_report()
            with open(os.path.join(output_dir, PRIVACY_REPORT_NAME), "w") as f:
                json.dump(report, f, indent=2)
            # Replaces the card peft's save_pretrained just wrote: the shared model states its guarantee.
            self._model_card(report).save(os.path.join(output_dir, "README.md"))
        codec = getattr(self, "codec", None)
        if codec is not None:
            # The codec's state is built from prior samples and already released (private) updates only.
            codec.save_pretrained(os.path.join(output_dir, CODEC_DIR))

    def _model_card(self, report: dict, finetuned_from: str | None = None, **kwargs):
        from .hub import build_model_card

        if finetuned_from is None:
            peft_config = getattr(self.model, "peft_config", {}).get("default")
            finetuned_from = getattr(peft_config, "base_model_name_or_path", None)
        eval_results = None
        for entry in reversed(self.state.log_history if self.state is not None else []):
            if any(k.startswith("eval_") for k in entry):
                eval_results = {k: v for k, v in entry.items() if k.startswith("eval_")}
                break
        from .hub import pipeline_tag_for

        kwargs.setdefault("pipeline_tag", pipeline_tag_for(self.model))
        return build_model_card(report, base_model=finetuned_from, eval_results=eval_results, **kwargs)

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
    ) -> None:
        """Write ``README.md`` in ``output_dir``: Hub metadata and the privacy report (called by ``push_to_hub``).

        Before ``train()`` there is no privacy report, and Trainer's own card is written. ``tasks`` and
        ``dataset_args`` are accepted for compatibility and not used; ``dataset`` / ``dataset_tags`` go into the
        ``datasets`` metadata and should be Hub dataset ids.
        """
        if not self.is_world_process_zero():
            return
        if self.ledger is None:
            return super().create_model_card(
                language=language, license=license, tags=tags, model_name=model_name, finetuned_from=finetuned_from,
                tasks=tasks, dataset_tags=dataset_tags, dataset=dataset, dataset_args=dataset_args,
            )
        datasets = dataset_tags if dataset_tags is not None else dataset
        card = self._model_card(
            self.privacy_report(), finetuned_from=finetuned_from, datasets=datasets, tags=tags, model_name=model_name,
            language=language, license=license,
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))
