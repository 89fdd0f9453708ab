"""The vectorized engine equals the Node engine on the same seed, feature by feature."""

import pytest
import torch

from gossipfl.config import ConfigError
from gossipfl.runtimes.sim import Simulation, choose_engine

FEATURES = {
    "sgd": dict(train__rho=0.0, train__momentum=0.0, train__weight_decay=0.0),
    "sam_momentum_wd": dict(train__rho=0.05, train__momentum=0.9, train__weight_decay=5e-4),
    "q_steps": dict(gossip__steps=3),
    "variance_follow_others": dict(gossip__merge="variance_corrected", gossip__init="independent"),
    "variance_follow_self": dict(gossip__merge="variance_corrected", gossip__variance_target="follow_self"),
    "variance_conservative": dict(gossip__merge="variance_corrected", gossip__variance_target="conservative"),
    "fmmc": dict(gossip__weights="fmmc", topology__kind="random_geometric", topology__nodes=10,
                 topology__radius=0.5),
    "poisson": dict(gossip__schedule="poisson", gossip__poisson_time=2.0, gossip__init="independent"),
    "poisson_variance": dict(gossip__schedule="poisson", gossip__merge="variance_corrected"),
    "independent_init": dict(gossip__init="independent", topology__kind="erdos_renyi", topology__nodes=8),
    "guard": dict(robust__guard="on", robust__guard_max_relative=0.5, gossip__init="independent"),
    "small_local_data": dict(data__partition="dirichlet", data__alpha=0.1, topology__nodes=16,
                             train__batch_size=64),
}
ROBUST = dict(topology__kind="random_regular", topology__nodes=10, topology__degree=4, byzantine__nodes=[2, 7])
FEATURES.update({
    "gaussian_clipped_gossip": dict(**ROBUST, byzantine__attack="gaussian", robust__filters=["clipped_gossip"]),
    "sign_flip_trimmed_mean": dict(**ROBUST, byzantine__attack="sign_flip", robust__filters=["trimmed_mean"]),
    "label_flip_krum": dict(**ROBUST, byzantine__attack="label_flip", robust__filters=["krum"],
                            robust__options={"krum": {"f": 1, "m": 2}}),
    "dissensus_bristle": dict(**ROBUST, byzantine__attack="dissensus", robust__filters=["bristle"],
                              robust__options={"bristle": {"closest": 2, "random": 1}}),
    "alie_balance": dict(**ROBUST, byzantine__attack="alie", byzantine__options={"z": 1.0}, robust__filters=["balance"]),
    "ipm_median": dict(**ROBUST, byzantine__attack="ipm", robust__filters=["median"]),
    "free_rider_guard": dict(**ROBUST, byzantine__attack="free_rider", robust__guard="on"),
    "poisson_sign_flip_clipped": dict(**ROBUST, byzantine__attack="sign_flip", robust__filters=["clipped_gossip"],
                                      robust__options={"clipped_gossip": {"tau": 0.05}},
                                      gossip__schedule="poisson", gossip__poisson_time=2.0),
})


def run_both(config, rounds=3):
    sims = {engine: Simulation(config(engine=engine), progress=False) for engine in ("nodes", "vectorized")}
    for r in range(rounds):
        losses = {engine: sim.step(r)[0] for engine, sim in sims.items()}
        assert losses["vectorized"] == pytest.approx(losses["nodes"], rel=1e-4, abs=1e-6)
    return sims["nodes"], sims["vectorized"]


@pytest.mark.parametrize("feature", FEATURES)
def test_vectorized_engine_equals_the_node_engine(small_config, feature):
    nodes, vectorized = run_both(lambda **kw: small_config(**FEATURES[feature], **kw))
    torch.testing.assert_close(vectorized.vectors(), nodes.vectors(), rtol=1e-4, atol=2e-5)
    counters = nodes.engine.counters(), vectorized.engine.counters()
    assert counters[0]["bytes_sent"] == counters[1]["bytes_sent"] > 0
    assert counters[0]["flagged"] == counters[1]["flagged"]
    if feature == "guard" or "robust__filters" in FEATURES[feature]:
        assert counters[0]["flagged"] > 0  # the test means something only if the filters acted
    a, b = nodes.evaluator.evaluate(nodes.vectors()), vectorized.evaluator.evaluate(vectorized.vectors())
    assert a["accuracy_mean"] == pytest.approx(b["accuracy_mean"], abs=0.02)
    seen = nodes.engine.observations(), vectorized.engine.observations()
    assert seen[0].keys() == seen[1].keys()
    for key, (messages, suspicion) in seen[0].items():
        assert seen[1][key][0] == messages and seen[1][key][1] == pytest.approx(suspicion, abs=1e-6)


def test_evaluation_of_a_sample_is_reported(small_config, tmp_path):
    sim = Simulation(small_config(rounds=1, eval__nodes=3, eval__test_samples=100), run_dir=tmp_path / "r",
                     progress=False)
    sim.run()
    metrics = sim.evaluator.evaluate(sim.vectors())
    assert metrics["eval_nodes"] == 3 and metrics["eval_test_samples"] == 100


def test_auto_picks_the_vectorized_engine(small_config):
    assert choose_engine(small_config())[0] == "vectorized"
    assert choose_engine(small_config(engine="nodes"))[0] == "nodes"


def test_an_unsupported_combination_is_refused_naming_the_field(small_config):
    with pytest.raises(ConfigError, match="device = 'cpu' needs engine = 'vectorized'|device = 'cuda'"):
        choose_engine(small_config(engine="nodes", device="cuda"))
    with pytest.raises(ConfigError, match="engine"):
        small_config(engine="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the no-GPU refusal cannot be seen here")
def test_cuda_without_a_gpu_is_refused(small_config):
    with pytest.raises(ConfigError, match="torch sees no CUDA GPU"):
        choose_engine(small_config(device="cuda"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none)")
def test_vectorized_engine_on_cuda_equals_the_cpu(small_config):
    sims = {d: Simulation(small_config(device=d, gossip__merge="variance_corrected"), progress=False)
            for d in ("cpu", "cuda")}
    for r in range(3):
        for sim in sims.values():
            sim.step(r)
    assert sims["cuda"].vectors().device.type == "cuda"
    torch.testing.assert_close(sims["cuda"].vectors().cpu(), sims["cpu"].vectors(), rtol=1e-3, atol=1e-4)
