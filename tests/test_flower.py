"""The federated mode on Flower, in this process: the strategy and the ClientApp give what FederatedSimulation gives
(same accountant history, same global adapter with noise seeded on each party), the party refuses to send un-noised
updates or to take a noise seed from a message, a failing party sends only a fixed code, and what is published does
not depend on who took part. A real SuperLink with 2 SuperNodes on 127.0.0.1 (a party that dies mid-round) and
Flower's simulation engine run the example app in test_flower_app.py."""

import math

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from conftest import make_cls_dataset, make_tiny_bert  # noqa: E402
from hf_drencoder.federated import FederatedArguments, FederatedSimulation, partition_dataset  # noqa: E402
from hf_drencoder.federated.flower import (  # noqa: E402
    ClientLevelDPStrategy,
    FlowerParty,
    federated_args_from_config,
)
from hf_drencoder.privacy import PrivacyBudgetError, compute_epsilon  # noqa: E402
from hf_drencoder.codec import LoraLayout  # noqa: E402
from hf_drencoder.lora import trainable_adapter_parameters, wrap_with_lora  # noqa: E402

TARGETS = ["query", "value"]


def fed_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "fed"), num_parties=4, parties_per_round=2, num_rounds=2, local_steps=2,
                local_batch_size=4, local_learning_rate=0.1, noise_multiplier=1.0, noise_seed=0, sampling_seed=3,
                seed=0, disable_tqdm=True, eval_every=0, lora_target_modules=TARGETS)
    base.update(kw)
    return FederatedArguments(**base)


def model_fn(context=None):
    return make_tiny_bert(seed=0)


def data_fn(partition_id, num_partitions, context=None):
    return partition_dataset(make_cls_dataset(n=48, seed=1), num_partitions, "iid", seed=0)[partition_id]


def lora(model):
    return wrap_with_lora(model, r=8, alpha=16, dropout=0.0, target_modules=TARGETS)


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads only add contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Flower stamps messages with the identity of the task that runs it; out of a run the test sets one."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


class FakeGrid:
    """Delivers the strategy's messages to FlowerParty objects in this process (no network)."""

    def __init__(self, parties: dict, run_config: dict, fail=None):
        self.parties = parties  # node id -> (FlowerParty, node_config)
        self.run_config = run_config
        self.fail = fail or (lambda node, msg: False)
        self.sent = []
        self.replies = []

    def get_node_ids(self):
        return list(self.parties)

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.sent.append((node, m))
            if self.fail(node, m):
                continue  # the party went away: no reply
            party, node_config = self.parties[node]
            replies.append(deliver(party, m, node_config, self.run_config, node, f"m{len(self.sent)}"))
        self.replies += replies
        return replies


def deliver(party, message, node_config, run_config=None, node=5, message_id="m1"):
    """What a SuperNode does with a message: run the ClientApp's train; an exception it raises becomes an Error reply
    whose reason is the exception's text, as Flower's runtime does."""
    from flwr.app import Error, Message

    context = Context(run_id=1, node_id=node, node_config=node_config, state=RecordDict(), run_config=run_config or {})
    message.metadata.__dict__["_message_id"] = message_id  # what the SuperLink assigns
    try:
        return party.train(message, context)
    except Exception as ex:  # noqa: BLE001 - flwr.supernode.runtime.run_clientapp does the same
        return Message(Error(code=2, reason=str(type(ex)) + ":<'" + str(ex) + "'>"), reply_to=message)


def node_config(i, args, **extra):
    """Party i's own SuperNode settings; its noise seed is local to it (the simulation's noise_seed, for equality)."""
    seed = {"noise-seed": args.noise_seed} if args.noise_seed is not None else {}
    return {"partition-id": i, "num-partitions": args.num_parties, **seed, **extra}


def run_strategy(args, fail=None, nodes=None, data=data_fn):
    nodes = nodes or [1000 + 7 * i for i in range(args.num_parties)]
    model = lora(model_fn())
    params = [p for _, p in trainable_adapter_parameters(model)]
    layout = LoraLayout.from_model(model)
    strategy = ClientLevelDPStrategy(args, layout, round_timeout=5)
    run_config = {"lora-target-modules": ",".join(TARGETS)}
    # node i is party i: the population is sorted by node id
    grid = FakeGrid({n: (FlowerParty(model_fn, data), node_config(i, args)) for i, n in enumerate(nodes)}, run_config, fail)
    from flwr.app import Array, ArrayRecord

    initial = ArrayRecord({"adapter": Array(layout.flatten([p.detach() for p in params]).numpy())})
    result = strategy.start(grid, initial)
    grid.result = result
    final = torch.from_numpy(result.arrays["adapter"].numpy().copy())
    return strategy, final, grid


def run_simulation(args, fail_party_round=None):
    full = make_cls_dataset(n=48, seed=1)
    sim = FederatedSimulation(lora(model_fn()), full, args)
    if fail_party_round is not None:
        step = sim.party_step

        def party_step(pid, r):
            if (pid, r) == fail_party_round:
                raise RuntimeError("party went away")
            return step(pid, r)

        sim.party_step = party_step
    sim.run()
    return sim, sim._global_flat()


def test_run_config_gives_federated_arguments():
    a = federated_args_from_config({"num-parties": 5, "parties-per-round": 2, "noise-multiplier": 1, "num-rounds": 3,
                                    "lora-target-modules": "query, value", "disable-tqdm": True, "other-key": "x"},
                                   output_dir="o")
    assert (a.num_parties, a.sample_rate, a.noise_multiplier, a.num_rounds) == (5, 0.4, 1.0, 3)
    assert a.lora_target_modules == ["query", "value"] and a.output_dir == "o"
    with pytest.raises(ValueError, match="exactly one"):
        federated_args_from_config({"num-parties": 5, "parties-per-round": 2})


def test_strategy_equals_the_in_process_simulation(tmp_path):
    """Poisson sampling at q = 0.5 over 4 parties, seeded noise: the same parties, the same accountant history and
    epsilon, and the same global adapter as FederatedSimulation (one implementation of the party and server steps).
    sampling_seed=3 samples no party in round 1 (the server draws the noise message itself), then 3. Both apply the
    updates with the same server optimizer (FedAdam here: its state carries over from round to round)."""
    args = fed_args(tmp_path, server_optimizer="fedadam", server_learning_rate=0.05)
    strategy, final, grid = run_strategy(args)
    sim, expected = run_simulation(fed_args(tmp_path, server_optimizer="fedadam", server_learning_rate=0.05))
    assert strategy.server_optimizer.state_tensors().keys() == sim.server_optimizer.state_tensors().keys() != set()
    assert strategy.ledger.accountant.history == sim.ledger.accountant.history == [(1.0, 0.5, 2)]
    assert [h["parties"] for h in strategy.history] == [h["parties"] for h in sim.history]
    assert {len(h["parties"]) for h in strategy.history} != {4}  # Poisson, not everyone every round
    # messages went only to the sampled parties' nodes
    assert sorted((n - 1000) // 7 for n, _ in grid.sent) == sorted(p for h in sim.history for p in h["parties"])
    for mine, theirs in zip(strategy.history, sim.history):
        for key in ("epsilon", "epsilon_rdp", "epsilon_prv", "mu_gdp", "uplink_bytes", "epsilon_server_view"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-9), key
    assert strategy.history[-1]["epsilon"] == pytest.approx(compute_epsilon([(1.0, 0.5, 2)], 1 / 4, "prv"), rel=1e-9)
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)


def test_a_party_that_goes_away_is_left_out_and_the_round_still_counts(tmp_path):
    args = fed_args(tmp_path, parties_per_round=4, num_rounds=2)  # q = 1: everyone is sampled
    strategy, final, _ = run_strategy(args, fail=lambda node, m: node == 1007 and m.content["config"]["round-index"] == 1)
    sim, expected = run_simulation(fed_args(tmp_path, parties_per_round=4, num_rounds=2), fail_party_round=(1, 1))
    assert strategy.history[1]["failed"] == [1] and strategy.history[1]["num_received"] == 3
    assert strategy.ledger.accountant.history == [(1.0, 1.0, 2)]
    assert strategy.history[-1]["epsilon"] == pytest.approx(sim.history[-1]["epsilon"], rel=1e-9)
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)


def test_strategy_follows_the_server_lr_schedule_as_the_simulation_does(tmp_path):
    kw = dict(parties_per_round=4, num_rounds=2, server_learning_rate=2.0)  # q = 1: everyone, every round
    strategy, final, _ = run_strategy(fed_args(tmp_path, server_lr_schedule="linear", **kw))
    _, expected = run_simulation(fed_args(tmp_path, server_lr_schedule="linear", **kw))
    _, constant = run_simulation(fed_args(tmp_path, **kw))
    assert [h["server_learning_rate"] for h in strategy.history] == [2.0, 1.0]
    torch.testing.assert_close(final, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(final, constant, rtol=1e-3, atol=1e-4)


def test_strategy_stops_at_the_budget(tmp_path):
    args = fed_args(tmp_path, noise_multiplier=None, target_epsilon=3.0, num_rounds=4, parties_per_round=4)
    strategy = ClientLevelDPStrategy(args, LoraLayout.from_model(lora(model_fn())))
    sigma = strategy.ledger.noise_multiplier
    assert compute_epsilon([(sigma, 1.0, 4)], 0.25, "prv") <= 3.0 + 1e-6
    strategy.ledger.max_total_steps = 2  # as if the budget allowed 2 rounds
    strategy.population = [1, 2, 3, 4]

    class NoReplies:
        def get_node_ids(self):
            return [1, 2, 3, 4]

        def send_and_receive(self, messages, timeout=None):
            return []

    from flwr.app import Array, ArrayRecord

    layout = strategy.layout
    strategy.start(NoReplies(), ArrayRecord({"adapter": Array(torch.zeros(layout.dim).numpy())}))
    assert strategy.round == 2 and strategy.ledger.steps == 2
    assert all(h["num_received"] == 0 and h["failed"] == [0, 1, 2, 3] for h in strategy.history)


def _context(node_config):
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def test_the_party_refuses_to_send_without_noise_or_below_its_floor():
    from flwr.app import ConfigRecord

    party = FlowerParty(model_fn, data_fn, min_noise_multiplier=0.8)
    cfg = lambda s, c=1.0: ConfigRecord({"noise-multiplier": s, "max-update-norm": c})  # noqa: E731
    assert party._check_privacy(cfg(1.0), _context({})) == (1.0, 1.0)
    with pytest.raises(PrivacyBudgetError, match="non-private"):
        party._check_privacy(cfg(0.0, math.inf), _context({}))
    with pytest.raises(PrivacyBudgetError, match="minimum"):
        party._check_privacy(cfg(0.5), _context({}))
    with pytest.raises(PrivacyBudgetError, match="minimum"):  # the node's own setting wins
        party._check_privacy(cfg(1.0), _context({"min-noise-multiplier": 1.5}))
    assert party._check_privacy(cfg(0.0, math.inf), _context({"allow-non-private": "true"})) == (0.0, math.inf)


def test_duplicate_partition_ids_are_refused(tmp_path):
    args = fed_args(tmp_path, num_parties=2, parties_per_round=2, num_rounds=1)
    model = lora(model_fn())
    strategy = ClientLevelDPStrategy(args, LoraLayout.from_model(model))
    grid = FakeGrid({11: (FlowerParty(model_fn, data_fn), {"partition-id": 0, "num-partitions": 2}),
                     12: (FlowerParty(model_fn, data_fn), {"partition-id": 0, "num-partitions": 2})},
                    {"lora-target-modules": "query,value"})
    from flwr.app import Array, ArrayRecord

    params = [p for _, p in trainable_adapter_parameters(model)]
    initial = ArrayRecord({"adapter": Array(strategy.layout.flatten([p.detach() for p in params]).numpy())})
    with pytest.raises(PrivacyBudgetError, match="partition-id 0"):
        strategy.start(grid, initial)


def _round_message(strategy, layout, config=None):
    """The first round's message to the first sampled party, as the strategy builds it."""
    from flwr.app import Array, ArrayRecord, ConfigRecord

    strategy.population = [1000 + 7 * i for i in range(strategy.args.num_parties)]
    model = lora(model_fn())  # the initial global adapter
    start = layout.flatten([p.detach() for _, p in trainable_adapter_parameters(model)])
    arrays = ArrayRecord({"adapter": Array(start.numpy())})
    return strategy.configure_train(1, arrays, ConfigRecord(config or {}), None)


def test_a_party_takes_its_noise_seed_only_from_its_own_settings(tmp_path):
    """A noise seed in a message would let the server regenerate and subtract the party's noise: the strategy never
    sends one (noise_seed seeds only its own k = 0 draw), a party refuses a round whose message carries one (a fixed
    code, nothing else), and a seed in the party's own node config (or FlowerParty(noise_seed=...)) is used."""
    layout = LoraLayout.from_model(lora(model_fn()))
    args = fed_args(tmp_path, parties_per_round=4)  # noise_seed=0 on the server
    messages = _round_message(ClientLevelDPStrategy(args, layout), layout)
    assert len(messages) == 4 and not any("noise-seed" in m.content["config"] for m in messages)
    with pytest.raises(PrivacyBudgetError, match="noise-seed"):  # nor can a train config smuggle one in
        _round_message(ClientLevelDPStrategy(args, layout), layout, {"noise-seed": 0})

    party = FlowerParty(model_fn, data_fn)
    msg = messages[0]
    msg.content["config"]["noise-seed"] = 0  # what a server that wants to replay the noise would send
    reply = deliver(party, msg, {"partition-id": 0, "num-partitions": 4})
    assert reply.has_error() and reply.error.reason == "party-refused" and not reply.has_content()

    def payload(party, cfg, msg_id):
        m = _round_message(ClientLevelDPStrategy(args, layout), layout)[0]
        reply = deliver(party, m, cfg, {"lora-target-modules": "query,value"}, message_id=msg_id)
        assert not reply.has_error()
        return torch.from_numpy(reply.content["message"]["payload"].numpy().copy())

    own = {"partition-id": 0, "num-partitions": 4}
    # unseeded: fresh OS entropy each round, whatever the server's noise_seed
    assert not torch.equal(payload(party, own, "a"), payload(party, own, "b"))
    # seeded locally: reproducible, and the same noise as the simulation's party 0 with noise_seed=0
    seeded = payload(party, {**own, "noise-seed": 0}, "c")
    torch.testing.assert_close(payload(FlowerParty(model_fn, data_fn, noise_seed=0), own, "d"), seeded)
    sim = FederatedSimulation(lora(model_fn()), make_cls_dataset(n=48, seed=1), fed_args(tmp_path / "sim", parties_per_round=4))
    sim._setup()
    torch.testing.assert_close(seeded, sim.party_step(0, 0).payload, rtol=1e-5, atol=1e-6)


def _bad_target_data(partition_id, num_partitions, context=None):
    if partition_id == 1:
        raise IndexError("Target 7 is out of bounds.")  # an error text that quotes the party's data
    return data_fn(partition_id, num_partitions, context)


def test_a_failing_party_sends_a_fixed_code_and_keeps_the_text_in_its_own_log(tmp_path, caplog):
    import logging

    args = fed_args(tmp_path, parties_per_round=4, num_rounds=1)
    with caplog.at_level(logging.INFO):
        strategy, _, grid = run_strategy(args, data=_bad_target_data)
    (bad,) = [r for r in grid.replies if r.has_error()]
    assert bad.error.reason == "party-error"  # what crossed the network
    assert strategy.history[0]["failed"] == [1] and strategy.history[0]["num_received"] == 3
    party_lines = [r.getMessage() for r in caplog.records if r.name == "flwr.hf_drencoder.party"]
    server_lines = [r.getMessage() for r in caplog.records if r.name == "flwr.hf_drencoder"]
    assert any("Target 7 is out of bounds" in line for line in party_lines)  # the party's own log has it
    assert server_lines and not any("Target 7" in line for line in server_lines)
    assert any("party-error" in line for line in server_lines)


def test_what_the_strategy_publishes_does_not_depend_on_who_answered(tmp_path):
    """Two runs that differ only in who answered (everyone, or nobody): the history written next to the model, the
    privacy report and the metrics each round returns are the same in every key and value but the update's norm."""
    args = fed_args(tmp_path, parties_per_round=4, num_rounds=2)
    everyone, _, g1 = run_strategy(args)
    nobody, _, g2 = run_strategy(args, fail=lambda node, m: True)
    assert [h["num_received"] for h in everyone.history] == [4, 4] and [h["num_received"] for h in nobody.history] == [0, 0]
    from hf_drencoder.federated.accounting import public_history

    def strip(records):
        return [{k: v for k, v in r.items() if k != "update_norm"} for r in records]

    pub1, pub2 = public_history(everyone.history), public_history(nobody.history)
    assert [set(r) for r in pub1] == [set(r) for r in pub2]
    assert strip(pub1) == strip(pub2)
    assert everyone.privacy_report() == nobody.privacy_report()
    assert everyone.privacy_report()["epsilon_server_view"] > 0
    m1, m2 = g1.result.train_metrics_clientapp, g2.result.train_metrics_clientapp
    assert [strip([dict(m1[r])]) for r in m1] == [strip([dict(m2[r])]) for r in m2]


def test_codec_auto_is_refused_on_flower(tmp_path):
    with pytest.raises(ValueError, match="codec='auto' is not available on Flower"):
        ClientLevelDPStrategy(fed_args(tmp_path, codec="auto"), LoraLayout.from_model(lora(model_fn())))
