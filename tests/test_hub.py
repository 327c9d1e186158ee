"""Model card with the privacy report, the saved layout, loading it back, and push_to_hub at the HTTP boundary."""

import base64
import io
import json
import math

import httpx2
import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import ModelCard
from peft import LoraConfig, PeftModel, get_peft_model

from conftest import dr_args, make_tiny_bert
from hf_drencoder import (DRTrainer, GradientCodec, LayoutMismatchError, LoraLayout, PrivacyBudgetError, __version__,
                          compute_epsilon)
from hf_drencoder.hub import build_model_card, hub_model_id, privacy_metadata


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cls_dataset_module):
    """One short private run on a tiny BERT, with a codec attached the way the trainer holds one."""
    tmp = tmp_path_factory.mktemp("hub")
    trainer = DRTrainer(model=make_tiny_bert(), args=dr_args(tmp, max_steps=3, noise_multiplier=1.1),
                        train_dataset=cls_dataset_module)
    trainer.train()
    trainer.codec = GradientCodec(layout=LoraLayout.from_model(trainer.model).to_dict(), latent_ratio=1 / 8)
    return trainer


@pytest.fixture(scope="module")
def cls_dataset_module():
    from conftest import make_cls_dataset

    return make_cls_dataset(n=64)


def test_saved_layout_card_and_reload(tmp_path, trained):
    out = tmp_path / "saved"
    trained.save_model(str(out))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"adapter_config.json", "adapter_model.safetensors", "privacy_report.json", "README.md",
            "codec/config.json", "codec/model.safetensors"} <= files

    report = json.loads((out / "privacy_report.json").read_text())
    assert report["steps"] == 3 and report["noise_multiplier"] == pytest.approx(1.1)
    # The card states what the accountant computes from (sigma, q, steps), not some other number.
    direct = compute_epsilon([(1.1, report["sample_rate"], 3)], report["delta"], "prv")
    assert report["epsilon"] == pytest.approx(direct, rel=1e-6)

    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "peft"
    assert {"hf-drencoder", "differential-privacy", "lora", "dr-encoder"} <= set(card.data.tags)
    dp = card.data.differential_privacy
    assert dp["epsilon"] == pytest.approx(report["epsilon"]) and dp["delta"] == pytest.approx(report["delta"])
    assert dp["epsilon_rdp"] == pytest.approx(report["epsilon_rdp"])
    assert dp["mu_gdp"] == pytest.approx(report["mu_gdp"])
    assert dp["noise_multiplier"] == pytest.approx(1.1) and dp["steps"] == 3
    assert dp["sample_rate"] == pytest.approx(8 / 64) and dp["max_grad_norm"] == 1.0
    assert dp["privacy_unit"] == "example" and dp["hf_drencoder_version"] == __version__
    text = card.text
    assert f"ε = {report['epsilon']:.4g}" in text and "example-level" in text
    assert "| privacy unit | example |" in text and "| clipping norm C | 1 |" in text
    assert f"| noise multiplier σ | {1.1:.4g} |" in text and "| steps (compositions) | 3 |" in text
    assert f"| hf-drencoder version | {__version__} |" in text
    assert report["codec_latent_ratio"] == pytest.approx(1 / 8) and dp["codec_latent_ratio"] == pytest.approx(1 / 8)
    assert f"| gradient codec latent ratio | {1 / 8:.4g} |" in text and "no codec" not in text

    reloaded = PeftModel.from_pretrained(make_tiny_bert(), str(out)).eval()
    trained.model.eval()
    batch = {"input_ids": torch.randint(1, 100, (2, 12)), "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, trained.model(**batch).logits)
    trained.model.train()

    trainable = PeftModel.from_pretrained(make_tiny_bert(), str(out), is_trainable=True)
    codec = GradientCodec.from_pretrained(str(out / "codec"), model=trainable)
    assert codec.latent_ratio == pytest.approx(1 / 8) and codec.latent_dim == trained.codec.latent_dim
    with pytest.raises(LayoutMismatchError):
        other = get_peft_model(make_tiny_bert(), LoraConfig(r=2, target_modules=["query"]))
        GradientCodec.from_pretrained(str(out / "codec"), model=other)


def test_card_from_report_with_codec_and_party_unit():
    report = {
        "epsilon": 2.5, "epsilon_rdp": 2.9, "epsilon_prv": 2.5, "epsilon_gdp": 2.3, "mu_gdp": 0.6,
        "accountant": "prv", "delta": 1e-5, "noise_multiplier": 0.9, "sample_rate": 0.1, "steps": 40, "rounds": 40,
        "max_grad_norm": 0.5, "privacy_unit": "party", "dp_enabled": True, "codec_latent_ratio": 1 / 64,
        "noise_space": "gradient", "uplink_bytes": 1024, "uplink_ratio": 0.0156,
        "history": [[2.0, 1.0, 1], [0.9, 0.1, 40]],
    }
    card = build_model_card(report, base_model="meta-llama/Llama-3.2-1B", datasets="org/data", tags=["x"])
    assert card.data.base_model == "meta-llama/Llama-3.2-1B" and card.data.datasets == ["org/data"]
    assert "x" in card.data.tags and "differential-privacy" in card.data.tags
    dp = card.data.differential_privacy
    assert dp["rounds"] == 40 and "steps" not in dp and dp["privacy_unit"] == "party"
    assert dp["codec_latent_ratio"] == pytest.approx(1 / 64) and dp["noise_space"] == "gradient"
    assert "party-level" in card.text and "| rounds (compositions) | 40 |" in card.text
    assert f"| gradient codec latent ratio | {1 / 64:.4g} |" in card.text and "`codec/`" in card.text
    assert "σ = 2, q = 1, 1 times" in card.text  # the stage-1 release is listed with the training steps
    no_codec = {k: v for k, v in report.items() if not k.startswith(("codec", "noise_space", "uplink"))}
    assert "| gradient codec latent ratio | no codec |" in build_model_card(no_codec).text
    assert "codec_latent_ratio" not in build_model_card(no_codec).data.differential_privacy
    # A local path is not a Hub id: it stays out of the metadata.
    assert build_model_card(report, base_model="/tmp/some/model").data.base_model is None
    assert hub_model_id("bert-base-uncased") == "bert-base-uncased" and hub_model_id("") is None


@pytest.mark.parametrize("name", ["a/b/c", "foo--bar", "x..y", "repo.git", ".hidden", "-dash", "a" * 97, "with space"])
def test_hub_model_id_uses_the_hub_validator(name):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    with pytest.raises(HFValidationError):
        validate_repo_id(name)
    assert hub_model_id(name) is None


def test_hub_model_id_never_takes_an_existing_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local-model").mkdir()
    assert hub_model_id("local-model") is None and hub_model_id("org/local-model") == "org/local-model"


REPORT = {"epsilon": 3.0, "epsilon_rdp": 3.4, "epsilon_prv": 3.0, "mu_gdp": 0.7, "accountant": "prv", "delta": 1e-5,
          "noise_multiplier": 1.1, "sample_rate": 0.01, "steps": 100, "max_grad_norm": 1.0, "privacy_unit": "example"}
EVAL = {"eval_loss": 0.42, "eval_accuracy": 0.91, "eval_macro_f1": 0.77, "eval_runtime": 3.2,
        "eval_samples_per_second": 101.5, "eval_steps_per_second": 4.0, "epoch": 1.0}


def test_card_is_a_peft_adapter_card_with_model_index():
    from huggingface_hub import EvalResult, ModelCardData
    from huggingface_hub.repocard_data import model_index_to_eval_results

    card = build_model_card(REPORT, base_model="bert-base-uncased", eval_results=EVAL, datasets="org/reuters",
                            model_name="dp-bert")
    # The Hub reads these fields: PEFT snippet and adapter-of relation, pipeline, tags.
    reloaded = ModelCard(str(card))
    data = reloaded.data
    assert data.library_name == "peft" and data.base_model == "bert-base-uncased"
    assert data.to_dict()["base_model_relation"] == "adapter"
    assert data.pipeline_tag == "text-classification"
    assert {"hf-drencoder", "differential-privacy"} <= set(data.tags)
    # model-index: one result per model metric, none for throughput.
    results = data.eval_results
    assert all(isinstance(r, EvalResult) for r in results)
    assert {r.metric_type: r.metric_value for r in results} == {"loss": 0.42, "accuracy": 0.91, "macro_f1": 0.77}
    assert {r.task_type for r in results} == {"text-classification"} and results[0].dataset_type == "org/reuters"
    yaml_text = str(card).split("---")[1]
    assert "model-index" in yaml_text
    assert not any(word in yaml_text for word in ("runtime", "samples_per_second", "steps_per_second"))
    assert "eval_runtime" not in card.text and "| accuracy | 0.91 |" in card.text
    # ModelCardData validation: the metadata rebuilds from its own dict, model-index included.
    meta = yaml.safe_load(yaml_text)
    name, parsed = model_index_to_eval_results(meta["model-index"])
    assert name == "dp-bert" and len(parsed) == 3
    rebuilt = ModelCardData(**meta)
    assert rebuilt.eval_results == results and rebuilt.differential_privacy == data.differential_privacy
    # the privacy block is unchanged by the Hub fields
    assert data.differential_privacy["epsilon"] == 3.0 and data.differential_privacy["steps"] == 100


def test_card_pipeline_tag_is_explicit_or_inferred():
    from hf_drencoder.hub import pipeline_tag_for

    lm = build_model_card(REPORT, eval_results={"eval_loss": 2.0, "eval_perplexity": 7.4})
    assert lm.data.pipeline_tag == "text-generation"
    assert build_model_card(REPORT, pipeline_tag="token-classification").data.pipeline_tag == "token-classification"
    # no metrics, no tag given: no pipeline is claimed, and no empty model-index is written
    bare = build_model_card(REPORT)
    assert bare.data.pipeline_tag is None and bare.data.eval_results is None and "model-index" not in str(bare)
    model = get_peft_model(make_tiny_bert(), LoraConfig(r=2, target_modules=["query"], task_type="SEQ_CLS"))
    assert pipeline_tag_for(model) == "text-classification" and pipeline_tag_for(task_type="CAUSAL_LM") == "text-generation"
    assert pipeline_tag_for() is None


def test_codec_card_states_stage1_cost_layout_and_links(tmp_path):
    from hf_drencoder.codec.card import PAPER_URL

    layout = LoraLayout(["m.lora_A.weight", "m.lora_B.weight"], [[2, 8], [8, 2]])
    history = [[1.0, 0.1, 4]]
    codec = GradientCodec(layout=layout.to_dict(), latent_ratio=1 / 4, stage1_privacy={
        "history": history, "unit": "example", "delta": 1e-5, "accountant": "prv",
        "released": "per-coordinate noisy sums of 4 batches"})
    codec.save_pretrained(tmp_path / "codec")
    card = ModelCard.load(tmp_path / "codec" / "README.md")
    assert "[More Information Needed]" not in str(card)
    dp = card.data.differential_privacy
    assert dp["epsilon"] == pytest.approx(compute_epsilon([(1.0, 0.1, 4)], 1e-5, "prv"))
    assert dp["epsilon_rdp"] == pytest.approx(compute_epsilon([(1.0, 0.1, 4)], 1e-5, "rdp"))
    assert dp["delta"] == 1e-5 and dp["history"] == history and dp["released"].startswith("per-coordinate")
    assert "differential-privacy" in card.data.tags and "hf-drencoder" in card.data.tags
    meta = card.data.gradient_codec
    assert meta["layout_fingerprint"] == layout.fingerprint and meta["latent_dim"] == codec.latent_dim
    assert f"ε = {dp['epsilon']:.4g}" in card.text and "δ = 1e-05" in card.text
    assert "`m.lora_A.weight` | 2 x 8" in card.text and layout.fingerprint in card.text
    assert PAPER_URL in card.text
    # the card is loadable back with the codec and its layout is what the card says
    assert GradientCodec.from_pretrained(str(tmp_path / "codec"), layout=layout).layout.fingerprint == layout.fingerprint


def test_codec_card_of_unknown_or_public_provenance_claims_no_privacy(tmp_path):
    layout = LoraLayout(["m.lora_A.weight"], [[2, 8]])
    unknown = GradientCodec(layout=layout.to_dict(), latent_ratio=1 / 4)
    card = unknown.generate_model_card()
    assert card.data.differential_privacy == {"stage": 1, "known": False}
    assert "differential-privacy" not in card.data.tags and "does not record" in card.text
    public = GradientCodec(layout=layout.to_dict(), latent_ratio=1 / 4).mark_public("built from public gradients")
    card = public.generate_model_card()
    assert card.data.differential_privacy["public"] is True and "built from public gradients" in card.text
    # a release without its delta: the history is stated, no epsilon is made up
    nodelta = GradientCodec(layout=layout.to_dict(), latent_ratio=1 / 4, stage1_privacy={"history": [[2.0, 1.0, 1]]})
    card = nodelta.generate_model_card()
    assert "epsilon" not in card.data.differential_privacy and "did not record its δ" in card.text


def test_card_of_a_non_private_run_claims_nothing():
    card = build_model_card({"dp_enabled": False, "epsilon": math.inf, "steps": 5})
    assert "differential-privacy" not in card.data.tags
    assert card.data.differential_privacy == {"enabled": False, "epsilon": math.inf}
    assert "WITHOUT differential privacy" in card.text
    assert privacy_metadata({"dp_enabled": False})["enabled"] is False


class FakeHub:
    """The Hub API as seen through huggingface_hub's HTTP client: records every request, accepts every commit."""

    def __init__(self):
        self.requests = []
        self.commits = []
        self.validated = []
        self.tokens = set()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path))
        if request.method == "POST":
            self.tokens.add(request.headers.get("authorization"))
        if path == "/api/repos/create":
            name = json.loads(request.content)["name"]
            return httpx2.Response(200, json={"url": f"https://huggingface.co/alice/{name}"})
        if path == "/api/validate-yaml":
            # The Hub checks README.md's metadata before the commit; here: it must be YAML with Hub-id fields.
            self.validated.append(json.loads(request.content)["content"])
            meta = yaml.safe_load(self.validated[-1].split("---")[1])
            if not isinstance(meta, dict) or str(meta.get("base_model", "")).startswith("/"):
                return httpx2.Response(400, json={"errors": [{"message": "bad metadata"}]})
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if "/preupload/" in path:
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if "/commit/" in path:
            lines = [json.loads(line) for line in request.content.decode().splitlines() if line]
            files = {ln["value"]["path"]: base64.b64decode(ln["value"]["content"]) for ln in lines if ln["key"] == "file"}
            self.commits.append((path, files))
            return httpx2.Response(200, json={"commitUrl": "https://huggingface.co/alice/x/commit/1", "commitOid": "1" * 40,
                                             "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": f"unexpected {request.method} {path}"})


def test_push_to_hub_uploads_adapter_codec_and_card(tmp_path, monkeypatch, trained):
    hub = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.test")
    monkeypatch.setattr(trained.args, "output_dir", str(tmp_path / "dp-bert"))
    monkeypatch.setattr(trained.args, "hub_token", "hf_test")
    monkeypatch.setattr(trained, "hub_model_id", None)
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
    try:
        with pytest.raises(PrivacyBudgetError, match="noise_seed"):  # the fixture's run is seeded (a test)
            trained.push_to_hub()
        assert not hub.commits
        trained.push_to_hub(allow_seeded_noise=True)
    finally:
        huggingface_hub.set_client_factory(huggingface_hub.utils._http.default_client_factory)

    assert ("POST", "/api/repos/create") in hub.requests
    assert all(host_path.startswith("/api/") for _, host_path in hub.requests)
    assert hub.tokens == {"Bearer hf_test"} and len(hub.validated) == 1
    (path, files), = hub.commits
    assert path == "/api/models/alice/dp-bert/commit/main"
    assert {"adapter_config.json", "adapter_model.safetensors", "privacy_report.json", "README.md",
            "codec/config.json", "codec/model.safetensors", "training_args.bin"} <= set(files)
    assert b"noise_seed" not in files["training_args.bin"] or torch.load(
        io.BytesIO(files["training_args.bin"]), weights_only=False).noise_seed is None  # the seed never leaves
    card = ModelCard(files["README.md"].decode())
    report = json.loads(files["privacy_report.json"])
    assert card.data.library_name == "peft"
    assert card.data.differential_privacy["epsilon"] == pytest.approx(report["epsilon"])
    assert card.data.differential_privacy["steps"] == report["steps"] == 3
    assert "# dp-bert" in card.text  # Trainer's model_name reaches our card
