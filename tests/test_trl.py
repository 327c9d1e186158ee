"""TRL's trainers made private: a model given by name, TRL's own sft.py with only the class swap, and DPO with one
preference pair as the privacy unit."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from datasets import Dataset

from conftest import make_tiny_llama, make_tiny_tokenizer

trl = pytest.importorskip("trl")

from hf_drencoder import DRTrainer, make_private  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def _chat(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (k,), generator=g))

    return [{"messages": [{"role": "user", "content": words(4)}, {"role": "assistant", "content": words(4)}]}
            for _ in range(n)]


def _sft_config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, max_steps=2, report_to="none",
                disable_tqdm=True, save_strategy="no", max_length=32, use_cpu=True, bf16=False)
    base.update(kw)
    return trl.SFTConfig(**base)


# ---- a model given by name ----

def test_sft_trainer_loads_a_model_name_with_model_init_kwargs_before_the_adapter_is_checked(
        tmp_path, offline, tiny_chat_llama, monkeypatch):
    import trl.trainer.utils as trl_utils
    from peft import LoraConfig, PeftModel

    calls, create = [], trl_utils.create_model_from_path

    def spy(name, **kwargs):
        calls.append((name, dict(kwargs)))
        kwargs.pop("quantization_config")  # (no bitsandbytes here: the spy checks the config reaches the loader)
        return create(name, **kwargs)

    monkeypatch.setattr(trl_utils, "create_model_from_path", spy)
    data = Dataset.from_list(_chat(16))
    quant = object()
    DRSFT = make_private(trl.SFTTrainer)
    trainer = DRSFT(model=str(tiny_chat_llama), args=_sft_config(tmp_path, model_init_kwargs={"dtype": "bfloat16"}),
                    train_dataset=data, quantization_config=quant)
    [(name, kwargs)] = calls
    assert name == str(tiny_chat_llama) and kwargs["dtype"] == "bfloat16" and kwargs["quantization_config"] is quant
    assert isinstance(trainer.model, PeftModel)  # the loaded model got the LoRA adapter, as an object would
    base = trainer.model.get_base_model()
    assert base.model.embed_tokens.weight.dtype == torch.bfloat16
    saved = make_tiny_llama().model.embed_tokens.weight
    torch.testing.assert_close(base.model.embed_tokens.weight.float(), saved.to(torch.bfloat16).float())
    assert trainer.args.model_init_kwargs is None  # used: TRL does not warn that they are ignored
    # the adapter checks run on the loaded model: a data-dependent LoRA init is refused
    with pytest.raises(ValueError, match="init_lora_weights='eva'"):
        DRSFT(model=str(tiny_chat_llama), args=_sft_config(tmp_path), train_dataset=data,
              peft_config=LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="eva"),
              quantization_config=quant)


def test_a_trainer_that_takes_no_model_name_refuses_one_with_the_fix(tmp_path, tiny_chat_llama):
    from conftest import dr_args, make_lm_dataset

    with pytest.raises(ValueError, match=r"Trainer does not load a model from a name. Load it first \(e\.g\. "
                                         r"AutoModelForCausalLM\.from_pretrained\(name\)\)"):
        DRTrainer(model=str(tiny_chat_llama), args=dr_args(tmp_path), train_dataset=make_lm_dataset())


# ---- TRL's own sft.py with only the class swap ----

SWAP = ("from hf_drencoder import make_private", "SFTTrainer = make_private(SFTTrainer)")


def trl_script(name="sft"):
    import trl.scripts

    return (pathlib.Path(trl.scripts.__file__).parent / f"{name}.py").read_text()


def with_class_swap(source):
    """TRL's script with the two lines of the class swap after its ``from trl import SFTTrainer, ...``."""
    lines = source.splitlines(keepends=True)
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("from trl import SFTTrainer"))
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    return "".join(lines[: at + 1] + [f"{indent}{line}\n" for line in SWAP] + lines[at + 1:])


def added_lines(original, changed):
    import difflib

    diff = list(difflib.ndiff(original.splitlines(), changed.splitlines()))
    assert not [d for d in diff if d.startswith("- ")], "lines of TRL's script were changed or removed"
    return [d[2:] for d in diff if d.startswith("+ ")]


def test_examples_run_sft_dr_is_trls_script_with_the_class_swap_and_a_header_comment():
    source = trl_script()
    example = (REPO / "examples" / "run_sft_dr.py").read_text()
    added = added_lines(source, example)
    swap = [line for line in added if not line.startswith("#")]
    assert [line.strip() for line in swap] == list(SWAP)
    assert added_lines(source, with_class_swap(source)) == [f"    {line}" for line in SWAP]
    assert example.replace("".join(f"{line}\n" for line in added if line.startswith("#")), "", 1) == \
        with_class_swap(source)  # the comment lines form one block


def _logged_epsilons(log):
    """epsilon of every Trainer log line printed (``{'loss': ..., 'epsilon': '1.84', ...}``)."""
    return [float(x.split("'epsilon': ")[1].split(",")[0].strip("}'\" ")) for x in log.splitlines() if "'epsilon': " in x]


def test_trls_sft_script_with_only_the_class_swap_trains_privately_offline(tmp_path, offline, tiny_chat_llama):
    script = tmp_path / "sft_dr.py"
    script.write_text(with_class_swap(trl_script()))
    data = tmp_path / "chat"
    data.mkdir()  # TRL's unmodified load_dataset(dataset_name) reads a local folder of data files
    (data / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in _chat(32)))
    out = tmp_path / "sft"
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_DRENCODER_")}
    env.update(HF_DRENCODER_TARGET_EPSILON="3", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    proc = subprocess.run([
        sys.executable, str(script), "--model_name_or_path", str(tiny_chat_llama), "--dataset_name", str(data),
        "--output_dir", str(out), "--use_cpu", "--bf16", "false", "--max_steps", "2", "--logging_steps", "2",
        "--report_to", "none", "--per_device_train_batch_size", "4", "--max_length", "32", "--use_peft",
        "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
    ], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["dp_enabled"] and report["steps"] == 2 and report["target_epsilon"] == 3.0
    assert 0 < report["epsilon"] <= 3.0 + 1e-6
    assert report["sample_rate"] == pytest.approx(4 / 32) and report["delta"] == pytest.approx(1 / 32)
    assert (out / "adapter_model.safetensors").is_file() and "differential_privacy:" in (out / "README.md").read_text()
    adapter = json.loads((out / "adapter_config.json").read_text())  # TRL's ModelConfig flags made the adapter
    assert adapter["r"] == 4 and sorted(adapter["target_modules"]) == ["q_proj", "v_proj"]
    logged = _logged_epsilons(log)
    assert len(logged) >= 2 and logged[-1] == pytest.approx(report["epsilon"], rel=1e-3)  # step 2 and the summary
    line = next(x for x in log.splitlines() if "privacy in force" in x)
    assert "got a plain SFTConfig" in line and "From the environment: target_epsilon=3.0" in line


# ---- DPO: one preference pair is the privacy unit ----

def _pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)

    def words(k):
        return " ".join(f"w{int(i)}" for i in torch.randint(0, 100, (k,), generator=g))

    def length():
        return int(torch.randint(1, 7, (1,), generator=g))

    return Dataset.from_list([{"prompt": words(3), "chosen": " " + words(length()), "rejected": " " + words(length())}
                              for _ in range(n)])


def _dpo_config(tmp_path, **kw):
    from hf_drencoder import private_arguments_class

    base = dict(output_dir=str(tmp_path / "dpo"), per_device_train_batch_size=4, max_steps=2, report_to="none",
                disable_tqdm=True, save_strategy="no", use_cpu=True, bf16=False, learning_rate=1e-2,
                noise_multiplier=1.0, noise_seed=0)
    base.update(kw)
    return private_arguments_class(trl.DPOConfig)(**base)


def test_trls_dpo_script_with_only_the_class_swap_trains_on_pairs_and_clips_one_vector_per_pair(
        tmp_path, offline, tiny_chat_llama, monkeypatch, capsys):
    import importlib.util

    from hf_drencoder.preference import PreferencePairsMixin
    from hf_drencoder.privacy.mechanism import GaussianGradientMechanism

    source = trl_script("dpo")
    swapped = source.replace("from trl import DPOTrainer, get_dataset, get_peft_config, get_quantization_config\n",
                             "from trl import DPOTrainer, get_dataset, get_peft_config, get_quantization_config\n"
                             "    from hf_drencoder import make_private\n    DPOTrainer = make_private(DPOTrainer)\n", 1)
    assert added_lines(source, swapped) == ["    from hf_drencoder import make_private",
                                            "    DPOTrainer = make_private(DPOTrainer)"]
    (tmp_path / "dpo_dr.py").write_text(swapped)
    data = tmp_path / "pairs"
    data.mkdir()
    _pairs(32).to_json(data / "train.jsonl")
    clipped, pairs = [], []
    add, losses = GaussianGradientMechanism.add_per_sample, PreferencePairsMixin.per_sample_losses

    def add_spy(self, grads):
        clipped.append(grads[0].shape[0])
        return add(self, grads)

    def loss_spy(self, model, inputs):
        out = losses(self, model, inputs)
        if torch.is_grad_enabled():
            pairs.append((out.shape[0], inputs["input_ids"].shape[0]))
        return out

    monkeypatch.setattr(GaussianGradientMechanism, "add_per_sample", add_spy)
    monkeypatch.setattr(PreferencePairsMixin, "per_sample_losses", loss_spy)
    monkeypatch.setenv("HF_DRENCODER_NOISE_MULTIPLIER", "1.0")  # (a fixed sigma: no calibration, faster)
    spec = importlib.util.spec_from_file_location("dpo_dr", tmp_path / "dpo_dr.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "dpo"
    script.main(*script.make_parser().parse_args_and_config([
        "--model_name_or_path", str(tiny_chat_llama), "--dataset_name", str(data), "--output_dir", str(out),
        "--use_cpu", "--bf16", "false", "--max_steps", "2", "--logging_steps", "2", "--report_to", "none",
        "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--disable_tqdm", "true",
        "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj", "v_proj",
    ]))
    # the mechanism clipped one vector per pair: a pair's chosen and rejected rows were summed first
    assert pairs and clipped == [b for b, _ in pairs] and all(rows == 2 * b for b, rows in pairs)
    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 2 and report["sample_rate"] == pytest.approx(4 / 32) and report["epsilon"] > 0
    assert report["privacy_unit"] == "preference pair" and report["noise_multiplier"] == 1.0
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert not (out / "ref").exists()  # one adapter: the reference is the base with the adapter disabled
    logged = _logged_epsilons(capsys.readouterr().out)
    assert len(logged) >= 2 and logged[-1] == pytest.approx(report["epsilon"], rel=1e-3)  # step 2 and the summary


def _dpo_trainer(tmp_path, loss_type="sigmoid", ref_model=None, **kw):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_llama()
    model.config.pad_token_id = 0
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # away from the zero init: every pair has a gradient in every direction
            torch.nn.init.normal_(p, std=0.1)
    config = _dpo_config(tmp_path, loss_type=[loss_type] if isinstance(loss_type, str) else loss_type,
                         assume_fresh_adapter=True, **kw)
    # positional arguments keep DPOTrainer's order (ref_model second)
    return make_private(trl.DPOTrainer)(model, ref_model, config, train_dataset=_pairs(16),
                                         processing_class=make_tiny_tokenizer())


def _assert_trls_loss_pair_by_pair(trainer):
    rows = [trainer.train_dataset[i] for i in range(6)]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    with torch.no_grad():
        per_pair = trainer.per_sample_losses(trainer.model, dict(batch))
        trls = trl.DPOTrainer._compute_loss(trainer, trainer.model, dict(batch), return_outputs=False)
        alone = torch.cat([trainer.per_sample_losses(trainer.model, trainer._prepare_inputs(trainer.data_collator([r])))
                           for r in rows])
    assert per_pair.shape == (6,)
    torch.testing.assert_close(per_pair.mean(), trls.float(), rtol=1e-5, atol=1e-6)  # TRL's batch mean
    torch.testing.assert_close(per_pair, alone, rtol=1e-5, atol=1e-6)  # a pair's loss ignores the other pairs
    trainer._check_example_independence()  # the numeric guard passes


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", ["sigmoid", "ipo"]])
def test_the_per_pair_loss_is_trls_dpo_loss_of_each_pair(tmp_path, loss_type):
    weights = {"loss_weights": [0.7, 0.3]} if isinstance(loss_type, list) else {}
    _assert_trls_loss_pair_by_pair(_dpo_trainer(tmp_path, loss_type, **weights))


@pytest.mark.parametrize("reference", ["precomputed", "ref_model"])
def test_precomputed_and_separate_references_give_trls_loss(tmp_path, reference):
    if reference == "precomputed":
        trainer = _dpo_trainer(tmp_path, precompute_ref_log_probs=True)
        assert "ref_chosen_logps" in trainer.train_dataset.column_names
    else:
        ref = make_tiny_llama(seed=1)
        ref.config.pad_token_id = 0
        trainer = _dpo_trainer(tmp_path, ref_model=ref)
        assert trainer.ref_model is not None
    _assert_trls_loss_pair_by_pair(trainer)


def _clipped_pair_sum(trainer, rows, c):
    from hf_drencoder.privacy.clipping import clip_and_sum
    from hf_drencoder.privacy.grouping import sum_by_group
    from hf_drencoder.privacy.per_sample import attach_grad_sample_hooks, pop_per_sample_gradients

    params = [p for p in trainer.model.parameters() if p.requires_grad]
    hooks = attach_grad_sample_hooks(trainer.model)
    try:
        trainer.model.train()
        batch = trainer._prepare_inputs(trainer.data_collator(rows))
        losses = trainer.per_sample_losses(trainer.model, batch)
        losses.sum().backward()
        units = trainer._rows_of_units(batch, len(rows))
        per_pair = sum_by_group(pop_per_sample_gradients(params, units.shape[0]), units, num_groups=len(rows))
    finally:
        hooks.cleanup()
    summed, _ = clip_and_sum(per_pair, c)
    return per_pair, torch.cat([s.flatten() for s in summed])


def test_one_pairs_gradient_is_clipped_whole_and_adding_a_pair_moves_the_clipped_sum_by_at_most_c(tmp_path):
    import warnings

    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    trainer = _dpo_trainer(tmp_path)
    from hf_drencoder.privacy.coupling import probe_rows

    data = trainer.train_dataset
    rows = [data[i] for i in probe_rows(data, max_rows=6)]  # rows[0]: the longest pair (the padded length changes)
    per_pair, with_pair = _clipped_pair_sum(trainer, rows, c=1e-3)
    # each pair's summed per-row gradient (chosen + rejected) is the gradient of that pair's loss alone
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    for i in (0, 3):
        trainer.model.zero_grad()
        trainer.per_sample_losses(trainer.model, trainer._prepare_inputs(trainer.data_collator([rows[i]]))).sum().backward()
        alone = torch.cat([p.grad.flatten() for p in params])
        torch.testing.assert_close(torch.cat([g[i].flatten() for g in per_pair]), alone, rtol=1e-4, atol=1e-7)
    trainer.model.zero_grad()
    norms = torch.stack([torch.cat([g[i].flatten() for g in per_pair]).norm() for i in range(len(rows))])
    assert bool((norms > 1e-3).all())  # every pair is clipped at C = 1e-3
    _, without = _clipped_pair_sum(trainer, rows[1:], c=1e-3)
    assert float((with_pair - without).norm()) <= 1e-3 * (1 + 1e-4)


@pytest.mark.parametrize("setting, message", [
    (dict(loss_type=["aot"]), "sorts the log-ratios of the whole batch"),
    (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0]), "averages the chosen tokens of the whole batch"),
    (dict(loss_type=["bco_pair"]), "not computed by the private per-pair loss; use one of sigmoid, hinge, ipo"),
    (dict(f_divergence_type="js_divergence"), "f_divergence_type='js_divergence'"),
    (dict(use_weighting=True), "use_weighting"),
    (dict(max_physical_batch_size=2), "max_physical_batch_size with preference pairs"),
    (dict(codec="auto"), "codec='auto' with preference pairs"),
])
def test_dpo_settings_outside_the_per_pair_analysis_are_refused_before_loading(tmp_path, setting, message):
    with pytest.raises(ValueError, match=message):
        make_private(trl.DPOTrainer)(model="never/loaded", args=_dpo_config(tmp_path, **setting), train_dataset=_pairs(4))


def test_activation_offloading_is_refused_not_dropped(tmp_path):
    model = make_tiny_llama()
    model.config.pad_token_id = 0
    with pytest.raises(ValueError, match="activation_offloading is applied by the trainer's own training_step"):
        make_private(trl.SFTTrainer)(model=model, args=_sft_config(tmp_path, activation_offloading=True),
                                     train_dataset=Dataset.from_list(_chat(8)), processing_class=make_tiny_tokenizer())
