"""The compiled decode step keeps compiling every model a process decodes with."""

import torch
from torch._dynamo.utils import counters

from simplified_slm.models import LlamaConfig, LlamaForCausalLM


def test_each_model_compiled_in_one_process_gets_its_own_graphs():
    # every model of a class shares its forward's code object, and dynamo keeps a limited
    # number of graphs per code object: a server or notebook decoding with models of several
    # shapes must not send the later ones to eager mode (with a limit of 2 the second model
    # hits it; models of one shape share their graphs and would not show it). Through
    # config.patch: monkeypatch's undo would delete the setting from dynamo's config module
    torch._dynamo.reset()
    new_graphs = []
    try:
        with torch._dynamo.config.patch(recompile_limit=2):
            for seed in range(3):
                torch.manual_seed(seed)
                model = LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=seed + 1)).eval()
                ids = torch.randint(0, 256, (1, 5))
                before = counters["stats"]["unique_graphs"]
                compiled = model.generate(ids, 6, greedy=True, compile=True)
                new_graphs.append(counters["stats"]["unique_graphs"] - before)
                assert torch.equal(compiled, model.generate(ids, 6, greedy=True))
    finally:
        torch._dynamo.reset()
    assert all(n >= 1 for n in new_graphs), new_graphs
