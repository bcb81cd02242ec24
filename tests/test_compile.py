"""Under --compile the training forward of every memory variant is one graph with no
break (head and loss compiled too): the exact optimiser then differentiates the
tables by the reference path, which dynamo traces; the fast path's custom backward
would break the graph at every layer. The lazy optimiser keeps the fast path."""

import pytest
import torch

from move import api
from move.training.optim import OptimConfig
from move.training.trainer import TrainConfig, prepare_model

VARIANTS = ["standard", "move", "lave", "bigram", "pkm", "value_residual"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_the_compiled_training_forward_is_one_graph(variant):
    model = api.build_model("tiny", vocab_size=256, value_memory=variant, memory_density=2)
    prepare_model(model, TrainConfig(compile=True))
    x = torch.randint(0, 256, (2, 32))
    explained = torch._dynamo.explain(lambda x: model(x, targets=x))(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_modes_by_optimiser_and_compilation():
    model = api.build_model("tiny", vocab_size=256, value_memory="move")
    modes = {}
    for compiled in (False, True):
        for optimizer in ("exact", "lazy"):
            prepare_model(model, TrainConfig(compile=compiled, optim=OptimConfig(value_memory_optimizer=optimizer)))
            modes[compiled, optimizer] = model.bank.grad_mode
    assert modes == {
        (False, "exact"): "dense",
        (False, "lazy"): "dense",
        (True, "exact"): "autograd",  # one graph
        (True, "lazy"): "dense",  # RowAdam needs the touched rows
    }
