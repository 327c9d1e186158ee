# Copyright 2020-2026 The HuggingFace Team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#
# TRL's `trl/scripts/sft.py` (trl 1.16), made differentially private with hf-drencoder. Every change from
# TRL's script is marked with a comment starting "hf-drencoder:".

# /// script
# dependencies = [
#     "trl",
#     "peft",
#     "hf-drencoder",
# ]
# ///

"""
# Private LoRA fine-tuning (the privacy settings come from the environment)
```bash
HF_DRENCODER_TARGET_EPSILON=3 python examples/run_sft_dr.py \
    --model_name_or_path path/to/model \
    --dataset_name path/to/chat.jsonl \
    --learning_rate 2.0e-3 \
    --max_steps 500 \
    --per_device_train_batch_size 32 \
    --gradient_accumulation_steps 8 \
    --use_peft \
    --lora_r 8 \
    --lora_alpha 16 \
    --lora_target_modules q_proj v_proj \
    --output_dir model-SFT-DR
```

`--dataset_name` is a Hub dataset (needs network), a folder written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`, or a local `.json` / `.jsonl` file (one example per line, with a `messages` column of
chat turns or a `text` column). The flags are TRL's (`ScriptArguments`, `SFTConfig`, `ModelConfig`): the privacy
settings are read from `HF_DRENCODER_*` environment variables (`HF_DRENCODER_TARGET_EPSILON`,
`HF_DRENCODER_PER_SAMPLE_MAX_GRAD_NORM`, ...) or from a file named in `HF_DRENCODER_CONFIG`. Without any, the run
gets target_epsilon=8, delta=1/N, C=1 and the PRV accountant. Under DP, `--packing` and `--padding_free` are
refused (they put several examples in one row) and SFTConfig's gradient checkpointing is turned off.

The output folder holds the adapter, `privacy_report.json` and a model card stating the guarantee.
"""

import argparse
import os


# hf-drencoder: --dataset_name may be a local file or a save_to_disk folder (offline runs); a Hub id or a folder
# of data files goes to load_dataset as in TRL's script.
def load_sft_dataset(dataset_name, name=None, streaming=False):
    from datasets import DatasetDict, load_dataset, load_from_disk

    if os.path.isfile(dataset_name):
        extension = dataset_name.rsplit(".", 1)[-1]
        extension = {"jsonl": "json", "txt": "text"}.get(extension, extension)
        return load_dataset(extension, data_files=dataset_name, streaming=streaming)
    if os.path.isdir(dataset_name) and any(
        os.path.isfile(os.path.join(dataset_name, f)) for f in ("dataset_dict.json", "dataset_info.json")
    ):
        dataset = load_from_disk(dataset_name)
        return dataset if isinstance(dataset, DatasetDict) else DatasetDict({"train": dataset})
    return load_dataset(dataset_name, name=name, streaming=streaming)


def main(script_args, training_args, model_args, dataset_args):
    import transformers
    from accelerate.logging import get_logger
    from packaging.version import Version

    from trl import SFTTrainer, get_dataset, get_peft_config, get_quantization_config
    from trl.trainer.utils import create_model_from_path

    from hf_drencoder import make_private

    # hf-drencoder: the class swap. The SFTConfig parsed below is a plain one: the trainer adds the privacy
    # fields, with the values of the HF_DRENCODER_* environment variables.
    SFTTrainer = make_private(SFTTrainer)

    logger = get_logger(__name__)

    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    # hf-drencoder: the private trainer wraps a model object with the LoRA adapter (it does not take a model name),
    # so the model is loaded here with the loader and keyword arguments SFTTrainer uses for a name. The tokenizer
    # is still loaded by SFTTrainer from the model's folder.
    model = create_model_from_path(
        model_args.model_name_or_path, quantization_config=get_quantization_config(model_args), **model_init_kwargs
    )

    # Load the dataset
    if dataset_args.datasets and script_args.dataset_name:
        logger.warning(
            "Both `datasets` and `dataset_name` are provided. The `datasets` argument will be used to load the "
            "dataset and `dataset_name` will be ignored."
        )
        dataset = get_dataset(dataset_args)
    elif dataset_args.datasets and not script_args.dataset_name:
        dataset = get_dataset(dataset_args)
    elif not dataset_args.datasets and script_args.dataset_name:
        # hf-drencoder: load_sft_dataset (local files and folders too) in place of load_dataset
        dataset = load_sft_dataset(
            script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")

    # Initialize the SFT trainer
    trainer = SFTTrainer(
        model=model,  # hf-drencoder: the model loaded above, in place of model_args.model_name_or_path
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        peft_config=get_peft_config(model_args),
    )

    # Train the model
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)

    # Log training complete
    trainer.accelerator.print("✅ Training completed.")

    # Save and push to Hub
    trainer.save_model(training_args.output_dir)  # with privacy_report.json and a model card stating the guarantee
    trainer.accelerator.print(f"💾 Model saved to {training_args.output_dir}.")

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")

    # Finish the trackers and destroy the process group
    if Version(transformers.__version__) >= Version("5.18.0"):
        trainer.end()


def make_parser(subparsers: argparse._SubParsersAction | None = None, prog: str | None = None):
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser

    dataclass_types = (ScriptArguments, SFTConfig, ModelConfig, DatasetMixtureConfig)
    if subparsers is not None:
        parser = subparsers.add_parser("sft", help="Run the SFT training script", dataclass_types=dataclass_types)
    else:
        parser = TrlParser(dataclass_types, prog=prog)
    return parser


if __name__ == "__main__":
    parser = make_parser()
    script_args, training_args, model_args, dataset_args = parser.parse_args_and_config(fail_with_unknown_args=False)
    main(script_args, training_args, model_args, dataset_args)
