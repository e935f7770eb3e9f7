import pytest
import torch

from honeypotnet.models import create_model
from honeypotnet.oracles import ModelOracle, OutputMode


def test_output_modes():
    p = torch.tensor([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]])
    assert torch.equal(OutputMode("label").apply(p), torch.tensor([[0.0, 1, 0], [1, 0, 0]]))
    top2 = OutputMode("topk", k=2).apply(p)
    assert torch.allclose(top2, torch.tensor([[0.0, 0.6 / 0.9, 0.3 / 0.9], [0.5 / 0.8, 0, 0.3 / 0.8]]))
    assert torch.allclose(OutputMode("rounded", decimals=0).apply(p), torch.tensor([[0.0, 1, 0], [0, 0, 0]]))
    assert torch.equal(OutputMode().apply(p), p)
    with pytest.raises(ValueError, match="output mode"):
        OutputMode("logits")


def test_model_oracle_counts_queries_and_enforces_budget():
    oracle = ModelOracle(create_model("cnn_small", 10), budget=10)
    out = oracle(torch.rand(6, 3, 32, 32))
    assert out.shape == (6, 10) and torch.allclose(out.sum(1), torch.ones(6)) and oracle.queries == 6
    assert oracle.num_classes == 10
    with pytest.raises(RuntimeError, match="budget"):
        oracle(torch.rand(5, 3, 32, 32))
    assert oracle.queries == 6


def test_model_oracle_rejects_bad_input():
    oracle = ModelOracle(create_model("cnn_small", 10))
    with pytest.raises(ValueError, match="shape"):
        oracle(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="NaN"):
        oracle(torch.full((1, 3, 32, 32), float("nan")))
    assert oracle.queries == 0
