"""The compiled decode step: every model a process decodes with gets graphs, and a model
changed between calls is decoded as the eager forward would."""

import torch
from torch._dynamo.utils import counters

from simplified_slm.generation.compiled_step import model_state
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


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_a_model_changed_between_calls_decodes_as_eager_does():
    """The compiled step leaves the model's own guards to `model_state`, checked once per
    call: weights trained in place reuse the graphs (parameters are graph inputs), while a
    hook, a cast or quantizing in place gets new graphs, and every compiled decode equals
    the eager one."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=2, intermediate_size=192)).eval()
    ids = torch.randint(0, 256, (1, 5))

    def both() -> tuple[torch.Tensor, torch.Tensor]:
        return model.generate(ids, 5, greedy=True, compile=True), model.generate(ids, 5, greedy=True)

    compiled, eager = both()
    assert torch.equal(compiled, eager)
    before = _graphs()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-1.5)  # in place, as an optimizer step: new values, same metadata
    compiled, changed = both()
    assert torch.equal(compiled, changed) and not torch.equal(changed, eager) and _graphs() == before
    handle = model.layers[0].mlp.register_forward_hook(lambda module, args, out: out * 0)
    compiled, hooked = both()
    assert torch.equal(compiled, hooked) and not torch.equal(hooked, changed)
    handle.remove()
    model.to(torch.float64)
    compiled, eager = both()
    assert torch.equal(compiled, eager)
    model.to(torch.float32).quantize("q8_0")
    compiled, eager = both()
    assert torch.equal(compiled, eager)


def test_model_state_names_what_a_graph_depends_on():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=2)).eval()
    twin = LlamaForCausalLM(LlamaConfig.preset("tiny", num_hidden_layers=2)).eval()
    state = model_state(model)
    model(torch.randint(0, 256, (1, 7)))  # builds caches (the RoPE table) that are not state
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert model_state(model) == state
    assert model_state(twin) != state  # the model's identity is part of it
    model.train()
    assert model_state(model) != state
    model.eval()
    model.layers[1].self_attn.register_forward_pre_hook(lambda module, args: None)
    hooked = model_state(model)
    assert hooked != state
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untied
    assert model_state(model) != hooked
