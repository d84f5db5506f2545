"""ssiu.compile: the whole fused model under torch.compile(fullgraph=True), and the
recompile policy (one dynamic graph for inference on many image sizes).

On CPU the fused kernels run through the Triton interpreter inside opaque custom ops, and
the rest of the graph is compiled with "aot_eager" (the same forward/backward graphs
Inductor would get, without its C++ build time on a 2-core machine).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import ssiu
from ssiu import training
from ssiu.compile import compile_for_inference, compile_for_training, graph_count

# head_dim 16: the smallest model every fused kernel (ESAM's tl.dot tiles) accepts.
FUSED_TINY = {"channels": 16, "heads": 1, "steps": 3}
COMPILER = "aot_eager"


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def grads_of(model, x):
    x = x.detach().requires_grad_()
    out = model(x)
    dout = torch.linspace(-1, 1, out.numel()).reshape(out.shape)
    leaves = (x, *model.parameters()) if not hasattr(model, "_orig_mod") else (
        x, *model._orig_mod.parameters())  # fmt: skip
    return out, torch.autograd.grad(out, leaves, dout)


@pytest.mark.interpreter
@pytest.mark.slow
def test_fused_model_compiles_whole_for_training():
    """fullgraph=True, recompile limit 1: output and every gradient equal eager's."""
    model = ssiu.build(2, **FUSED_TINY).set_backend("triton")
    x = torch.rand(1, 3, 16, 16)
    compiled = compile_for_training(model, COMPILER)
    with torch._dynamo.config.patch(recompile_limit=1):
        out_c, grads_c = grads_of(compiled, x)
    assert graph_count() == 1
    out_e, grads_e = grads_of(model, x)
    torch.testing.assert_close(out_c, out_e, rtol=1e-6, atol=1e-6)
    for gc, ge in zip(grads_c, grads_e, strict=True):
        torch.testing.assert_close(gc, ge, rtol=1e-5, atol=1e-6)


def test_inference_graphs_bounded_across_sizes():
    """Three image sizes (one square, padded and unpadded) -> at most 2 graphs, exact.

    Graph count is decided by Dynamo's guards, before any compiler runs, so the "eager"
    compiler (Dynamo only) keeps this fast.
    """
    model = ssiu.build(2, **FUSED_TINY).eval()
    forward = compile_for_inference(model, "eager")
    assert compile_for_inference(model, "eager") is forward  # cached per model
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=2):
        for h, w in ((16, 16), (20, 40), (36, 18)):
            x = torch.rand(1, 3, h, w)
            out = forward(x)
            assert out.shape == (1, 3, 2 * h, 2 * w)
            torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-6)
    # The first (square, exactly 16) input may specialise; every later size shares one
    # dynamic graph.
    assert graph_count() <= 2


def test_inference_checks_input_eagerly():
    model = ssiu.build(2, **FUSED_TINY).eval()
    with pytest.raises(ValueError, match="at least 9x9"):
        compile_for_inference(model, COMPILER)(torch.rand(1, 3, 8, 20))


def test_compiled_training_matches_eager(tmp_path):
    photos = {k: v[:64, :64] for k, v in ssiu.data.sample_images(["chelsea", "coffee"]).items()}
    common = dict(dataset=photos, scale=2, model_options={"channels": 16, "heads": 2,
                  "steps": 3}, iterations=2, batch_size=2, patch_size=16, log_every=1,
                  val_every=0, progress=False, out_dir=None)  # fmt: skip
    eager = training.train(**common)
    compiled = training.train(**common, compile=True, compile_backend=COMPILER)
    assert graph_count() == 1  # fixed-size patches: one static graph
    le = [e["loss"] for e in eager.history["train"]]
    lc = [e["loss"] for e in compiled.history["train"]]
    assert lc == pytest.approx(le, rel=1e-5)
    for (name, a), b in zip(eager.model.state_dict().items(),
                            compiled.model.state_dict().values(), strict=True):  # fmt: skip
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


def test_inference_cache_does_not_keep_models_alive():
    import copy
    import gc
    import weakref

    model = ssiu.build(2, channels=8, heads=2, steps=3).eval()
    forward = compile_for_inference(model, "eager")
    assert compile_for_inference(copy.deepcopy(model), "eager") is not forward  # own cache
    alive = weakref.ref(model)
    del model, forward
    gc.collect()
    assert alive() is None


def test_recompile_limit_is_restored():
    from ssiu.compile import RECOMPILE_LIMIT, recompile_limit

    config = torch._dynamo.config
    with config.patch(recompile_limit=1):
        with recompile_limit():
            assert config.recompile_limit == RECOMPILE_LIMIT
        assert config.recompile_limit == 1
