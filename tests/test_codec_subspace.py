"""The subspace codec: a projection onto directions from released gradients and a public per-step sketch; in
DRTrainer with noise in its latent space."""

import pytest
import torch
from opacus.accountants import RDPAccountant

from conftest import dr_args, make_cls_dataset, make_tiny_bert
from hf_drencoder import DRTrainer
from hf_drencoder.codec import LayoutMismatchError, LoraLayout, SubspaceCodec, load_codec

LAYOUT = LoraLayout(
    ["m.lora_A.default.weight", "m.lora_B.default.weight", "c.modules_to_save.default.weight"],
    [(8, 96), (96, 8), (4, 96)],
)


def _codec(**kw):
    return SubspaceCodec(LAYOUT.to_dict(), kw.pop("latent_ratio", 1 / 16), **kw)


def test_the_message_is_a_projection_with_a_budget_per_part():
    c = _codec(head_share=None)  # in proportion to size
    assert c.budget == {"lora": 96, "head": 24} and c.latent_dim == 120 and c.payload_bytes == 480
    g = torch.randn(3, LAYOUT.dim)
    for _ in range(3):  # before and after a history exists
        d = c.decode(c.encode(g))
        assert torch.allclose(c.decode(c.encode(d)), d, atol=1e-4)  # idempotent
        assert (d * (g - d)).sum(1).abs().max() < 1e-3 * g.norm(dim=1).max() ** 2  # orthogonal residual
        assert torch.allclose(c.encode(g[0]), c.encode(g)[0], atol=1e-5)  # linear, one row at a time or batched
        c.observe(d[0])
    # the head has its own budget: a gradient on the head alone does not take the LoRA part's latent
    head = torch.zeros(LAYOUT.dim)
    head[-384:] = torch.randn(384)
    assert c.encode(head)[:96].abs().max() < 1e-6


def test_a_zero_message_decodes_to_zero_and_a_persistent_direction_is_recovered():
    c = _codec(history=2)
    assert c.decode(torch.zeros(c.latent_dim)).abs().max() == 0
    v = torch.randn(LAYOUT.dim)
    first = c.decode(c.encode(v))
    assert torch.nn.functional.cosine_similarity(first, v, 0) < 0.5  # a random sketch of 1/16 sees little
    c.observe(v)
    assert c.decode(torch.zeros(c.latent_dim)).abs().max() == 0  # the history is a basis, not an offset
    again = c.decode(c.encode(v))
    assert torch.nn.functional.cosine_similarity(again, v, 0) > 0.999  # released direction: measured exactly
    blind = _codec(history=0)
    blind.observe(v)
    assert torch.nn.functional.cosine_similarity(blind.decode(blind.encode(v)), v, 0) < 0.5


def test_unbiased_scale_makes_the_sketch_part_unbiased_and_keeps_the_history_exact():
    g = torch.randn(LAYOUT.dim)
    for scale, expect in (("projection", 1 / 16), ("unbiased", 1.0)):
        c = _codec(history=0, scale=scale)
        mean = torch.zeros(LAYOUT.dim)
        for _ in range(400):  # a fresh public sketch every step
            mean += c.decode(c.encode(g)) / 400
            c.state_step += 1
            c._cache = None
        # E[decode(encode(g))] = (r / d) g for the projection, g for the unbiased decoder (per part; 1/16 for both)
        assert (mean @ g) / (g @ g) == pytest.approx(expect, rel=0.1)
        assert torch.nn.functional.cosine_similarity(mean, g, 0) > (0.5 if scale == "unbiased" else 0.2)
    c = _codec(history=2, scale="unbiased")
    c.observe(g)  # a released direction is measured exactly, never amplified
    assert torch.allclose(c.decode(c.encode(g)), g, atol=1e-4)
    assert c.decode(torch.zeros(c.latent_dim)).abs().max() == 0
    with pytest.raises(ValueError, match="scale"):
        _codec(scale="bias")


def test_the_basis_is_public_state_only():
    a, b, other = _codec(seed=1), _codec(seed=1), _codec(seed=2)
    g = torch.randn(LAYOUT.dim)
    assert torch.equal(a.encode(g), b.encode(g)) and not torch.allclose(a.encode(g), other.encode(g))
    z = a.encode(g)
    assert torch.equal(a.encode(g), z)  # encoding changes nothing: every micro-batch of a step uses one map
    released = a.decode(z)
    a.observe(released)
    b.observe(released)
    h = torch.randn(LAYOUT.dim)
    assert torch.equal(a.encode(h), b.encode(h))  # both ends follow the same released messages
    assert not torch.equal(a.encode(h), _codec(seed=1).encode(h))  # ... and the step moves the sketch on


def test_raw_head_is_counted_and_the_state_saves_and_loads(tmp_path):
    c = _codec(head="raw")
    assert c.latent_dim == 96 + 384 and c.payload_bytes == 4 * (96 + 384)
    g = torch.randn(LAYOUT.dim)
    assert torch.equal(c.decode(c.encode(g))[-384:], g[-384:])
    c.observe(g)
    c.save_pretrained(tmp_path / "s")
    loaded = load_codec(str(tmp_path / "s"), layout=LAYOUT)
    assert isinstance(loaded, SubspaceCodec) and loaded.step == 1 and loaded.head == "raw"
    assert torch.equal(loaded.encode(g), c.encode(g))
    with pytest.raises(LayoutMismatchError):
        load_codec(str(tmp_path / "s"), layout=LoraLayout(["x.lora_A.weight"], [(2, 4)]))
    for bad in ({"head": "zip"}, {"history": -1}, {"momentum": 1.0}, {"latent_ratio": 0.0}):
        with pytest.raises(ValueError):
            _codec(**bad)


N = 96


def test_trainer_clips_and_noises_the_subspace_latent(tmp_path, caplog):
    sigma, C, B = 2.0, 0.05, 16
    args = dr_args(tmp_path, noise_multiplier=sigma, per_sample_max_grad_norm=C, per_device_train_batch_size=B,
                   max_steps=3, codec="subspace", codec_latent_ratio=1 / 16, noise_space="latent")
    trainer = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=make_cls_dataset(n=N))
    per_sample, sums, released = [], [], []
    start = trainer._start_mechanism

    def spy(step):
        start(step)
        mech = trainer._mechanism
        add, release = mech.add_per_sample, mech.release
        mech.add_per_sample = lambda g: per_sample.append(g[0].clone()) or add(g)

        def rel(all_reduce=None):
            sums.append(mech._sums[0].clone())
            out = release(all_reduce)
            released.append(out[0].clone())
            return out

        mech.release = rel

    trainer._start_mechanism = spy
    with caplog.at_level("WARNING", logger="hf_drencoder"):
        trainer.train()
    codec = trainer.codec
    assert f"noised in the codec's latent: {codec.latent_dim} dimensions" in caplog.text
    assert isinstance(codec, SubspaceCodec) and codec.step == 3
    assert all(z.shape[1] == codec.latent_dim for z in per_sample)
    assert max(z.norm(dim=1).max().item() for z in per_sample) > C  # clipping had work to do ...
    total = sum(z.shape[0] for z in per_sample)
    assert sum(s.norm().item() for s in sums) <= total * C * (1 + 1e-4)  # ... and every latent is within C
    noise = torch.cat([y - s / B for s, y in zip(sums, released)])
    assert noise.std().item() == pytest.approx(sigma * C / B, rel=0.15)  # 3 x ~200 latent coordinates
    report = trainer.privacy_report()
    assert report["noise_space"] == "latent" and report["codec_stage1_privacy"]["public"]
    # the same mechanism as uncompressed DP-SGD, nothing else in the ledger: opacus' own RDP accountant agrees
    rdp = RDPAccountant()
    rdp.history = [(sigma, B / N, 3)]
    assert report["epsilon_rdp"] == pytest.approx(rdp.get_epsilon(report["delta"]), rel=1e-3)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert logs[-1]["uplink_bytes"] == codec.payload_bytes < 4 * trainer.layout.dim / 8


def test_adding_one_example_moves_the_latent_sum_by_at_most_C():
    from hf_drencoder.privacy.mechanism import GaussianGradientMechanism

    c = _codec()
    C = 0.1
    g = torch.randn(40, LAYOUT.dim)
    sums = []
    for rows in (g[:39], g):
        mech = GaussianGradientMechanism([torch.zeros(c.latent_dim)], max_grad_norm=C, noise_multiplier=0.0,
                                         expected_batch_size=1)
        mech.add_per_sample([c.encode(rows)])
        sums.append(mech._sums[0].clone())
    assert (sums[1] - sums[0]).norm().item() <= C * (1 + 1e-5)
    assert (sums[1] - sums[0]).norm().item() > 0.5 * C  # the bound is reached, not trivially met


def test_trainer_resumes_the_subspace_state(tmp_path):
    args = dr_args(tmp_path, max_steps=2, codec="subspace", noise_space="latent", save_strategy="steps",
                   save_steps=2)
    first = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=make_cls_dataset(n=N))
    first.train()
    ckpt = tmp_path / "out" / "checkpoint-2"
    assert (ckpt / "codec" / "config.json").is_file()
    args = dr_args(tmp_path, max_steps=3, codec="subspace", noise_space="latent", save_strategy="no")
    resumed = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=make_cls_dataset(n=N))
    resumed.train(resume_from_checkpoint=str(ckpt))
    assert resumed.codec.step == 3
    assert torch.equal(resumed.codec.state_dict()["recent"][1], first.codec.state_dict()["recent"][0])


def test_federated_subspace_messages_resume_and_cost_nothing(tmp_path, caplog):
    from hf_drencoder.federated import FederatedSimulation
    from hf_drencoder.privacy import compute_epsilon
    from test_federated import _adapter, fed_args

    args = fed_args(tmp_path, num_rounds=3, eval_every=0, codec="subspace", codec_latent_ratio=1 / 16)
    first = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48), args)
    with caplog.at_level("WARNING", logger="hf_drencoder.federated.simulation"):
        history = first.run(max_rounds=2)
    codec = first.codec
    # the server applies the decoded update at its learning rate: the federated default decodes unbiased, and it
    # keeps no history (a fresh projection every round measured best there)
    assert isinstance(codec, SubspaceCodec) and codec.step == 2 and codec.scale == "unbiased" and codec.history == 0
    k, d = codec.latent_dim, first.layout.dim
    assert f"bounds each party's latent ({k} of {d} values)" in caplog.text and f"{(k / d) ** 0.5:.3g}" in caplog.text
    assert all(h["uplink_bytes_per_party"] == codec.payload_bytes < 4 * first.layout.dim / 8 for h in history)
    # nothing but the training rounds in the client-level accountant
    assert history[-1]["epsilon"] == pytest.approx(compute_epsilon([(1.0, 0.5, 2)], 1 / 6, "prv"), rel=1e-9)
    state = tmp_path / "fed" / "last-state"
    args2 = fed_args(tmp_path, num_rounds=3, eval_every=0, codec="subspace", codec_latent_ratio=1 / 16,
                     resume_from_checkpoint=str(state))
    second = FederatedSimulation(make_tiny_bert(seed=3), make_cls_dataset(n=48), args2)
    second._setup()
    assert second.codec.step == 2 and second.codec.scale == "unbiased" and second.codec.history == 0
    assert torch.equal(_adapter(second), _adapter(first))


def test_head_share_splits_the_same_total_budget():
    c = _codec(head_share=0.5)
    assert c.budget == {"lora": 60, "head": 60} and c.latent_dim == _codec(head_share=None).latent_dim
    with pytest.raises(ValueError, match="head_share"):
        _codec(head_share=0.5, head="raw")
    for bad in (1.0, 0.0, "half", True):
        with pytest.raises(ValueError, match="head_share"):
            _codec(head_share=bad)


def test_the_default_head_share_is_half_from_1_64_up_and_in_proportion_below(tmp_path):
    # LoRA 1,536 values, head 384: the default is what measured best at each budget (docs/codec.md)
    for ratio, budget in ((1 / 4, {"lora": 240, "head": 240}), (1 / 16, {"lora": 60, "head": 60}),
                          (1 / 64, {"lora": 15, "head": 15}), (1 / 128, {"lora": 12, "head": 3})):
        c = _codec(latent_ratio=ratio)
        assert c.budget == budget, ratio
        assert c.latent_dim == _codec(latent_ratio=ratio, head_share=None).latent_dim  # the same bytes
    assert _codec(latent_ratio=1 / 128).budget == _codec(latent_ratio=1 / 128, head_share=None).budget
    # a raw head has nothing to split; a layout without a head neither
    assert _codec(head="raw").budget == {"lora": 96} and _codec(head="raw").head_share is None
    lora_only = LoraLayout(["m.lora_A.default.weight", "m.lora_B.default.weight"], [(8, 96), (96, 8)])
    assert SubspaceCodec(lora_only.to_dict(), 1 / 16).budget == {"lora": 96}
    # saved and loaded: "auto" stays "auto", and a codec saved with the split in proportion (head_share=None, the
    # default before "auto") keeps it
    for share, budget in (("auto", {"lora": 60, "head": 60}), (None, {"lora": 96, "head": 24})):
        _codec(head_share=share).save_pretrained(tmp_path / str(share))
        assert load_codec(str(tmp_path / str(share)), layout=LAYOUT).budget == budget


def test_the_trainer_builds_the_default_split_and_federated_runs_keep_the_proportional_one(tmp_path):
    from hf_drencoder.federated import FederatedSimulation
    from test_federated import fed_args

    args = dr_args(tmp_path, noise_multiplier=1.0, max_steps=1, codec="subspace", codec_latent_ratio=1 / 16,
                   noise_space="latent")
    trainer = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=make_cls_dataset(n=N))
    trainer.train()
    head = sum(b.numel for b in trainer.layout.blocks if not b.factor.startswith("lora"))
    assert trainer.codec.head_share == 0.5 and trainer.codec.budget["head"] == min(head, trainer.codec.latent_dim // 2)
    sim = FederatedSimulation(make_tiny_bert(), make_cls_dataset(n=48),
                              fed_args(tmp_path, num_rounds=1, eval_every=0, codec="subspace", codec_latent_ratio=1 / 16))
    sim._setup()
    assert sim.codec.head_share is None
    assert sim.codec.budget == SubspaceCodec.for_model(sim.layout, 1 / 16, head_share=None).budget


def test_baselines_can_code_the_head_for_a_total_byte_budget():
    from hf_drencoder.codec.baselines import make_baseline

    for kind in ("top-k", "random-projection"):
        raw, coded = make_baseline(kind, LAYOUT, 1 / 16), make_baseline(kind, LAYOUT, 1 / 16, raw_head=False)
        assert raw.raw_dim == 384 and coded.raw_dim == 0
        assert coded.payload_bytes < raw.payload_bytes and coded.coded_dim == LAYOUT.dim
        g = torch.zeros(LAYOUT.dim)
        g[-384:] = torch.randn(384)  # a gradient on the head only still gets through the coded message
        assert coded.decode(coded.encode(g))[-384:].abs().sum() > 0


def test_a_federated_party_clips_and_noises_its_latent():
    from hf_drencoder.federated import Party

    c = _codec()
    party = Party(0, [0], lambda rows: rows)
    update = 5 * torch.randn(LAYOUT.dim)
    clean = party.message(update, max_norm=0.5, noise_multiplier=0.0, generator=None, codec=c)
    assert clean.kind == "latent" and clean.payload.numel() == c.latent_dim
    assert clean.payload.norm().item() == pytest.approx(0.5, rel=1e-5)  # the latent, clipped to C
    assert torch.allclose(clean.payload, c.encode(update) * 0.5 / c.encode(update).norm(), atol=1e-6)
    noisy = [party.message(update, max_norm=0.5, noise_multiplier=2.0, generator=torch.Generator().manual_seed(s),
                           codec=c).payload - clean.payload for s in range(20)]
    assert torch.stack(noisy).std().item() == pytest.approx(2.0 * 0.5, rel=0.05)  # 20 x 120 latent coordinates
    # a round with fewer messages than noise shares: the server's top-up is drawn in the latent, at full strength
    from hf_drencoder.federated import FederatedServer

    server = FederatedServer(LAYOUT, num_parties=100, sample_rate=0.1, max_norm=0.5, noise_multiplier=2.0, codec=c,
                             noise_seed=0, noise_shares=10)
    top_up = torch.stack([server.phantom_message(r, shares=4) for r in range(20)])
    assert top_up.shape[1] == c.latent_dim
    assert top_up.std().item() == pytest.approx(server.party_noise_multiplier * 0.5 * 2, rel=0.05)


def test_subspace_in_gradient_space_says_what_it_costs(tmp_path, caplog):
    args = dr_args(tmp_path, max_steps=1, codec="subspace")  # noise_space left at "gradient"
    trainer = DRTrainer(model=make_tiny_bert(), args=args, train_dataset=make_cls_dataset(n=N))
    with caplog.at_level("WARNING", logger="hf_drencoder"):
        trainer.train()
    assert "Set noise_space='latent'" in caplog.text and isinstance(trainer.codec, SubspaceCodec)


def test_flower_refuses_the_subspace_codec_by_name_object_and_folder(tmp_path):
    from hf_drencoder.federated.flower_common import _load_codec

    _codec().save_pretrained(tmp_path / "s")
    for spec in ("subspace", _codec(), str(tmp_path / "s")):
        with pytest.raises(ValueError, match="not available on Flower"):
            _load_codec(spec, None)
