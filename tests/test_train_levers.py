"""The speed levers of a DRaFT step (issue 15) keep the eager gradient: CUDA graphs for the no-grad prefix (their
plumbing on CPU, where there is nothing to capture), and bf16 autocast reaching every denoiser call, the checkpoint
recomputation in backward included. torch.compile of the prefix is checked in test_train_semantics.py; the GPU
measurements of all three are in bench/gpu_run.py."""
import os
import sys

import pytest
import torch

from rewardlab.training import bundle as bundle_mod
from rewardlab.training.draft import DraftConfig, Trainer

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _train_fixtures import TARGETS, reward, toy_bundle

N = 5


def make(**kw):
    cfg = DraftConfig(method="draft_k", k=2, steps=N, batch_size=3, cfg=2.0, rank=2, targets=TARGETS,
                      scheduler="karras", seed=3, **kw)
    tr = Trainer(toy_bundle(), reward, cfg, prompts=["a red", "a blue", "a green"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():                     # up = 0 at init would zero every down-gradient: randomise it
        for a in tr.adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.3)
    return tr


def grads(tr, plan):
    return torch.autograd.grad(tr.loss(plan)[0], tr.params)


def assert_close(a, b, **tol):
    for ga, gb in zip(a, b):
        torch.testing.assert_close(ga, gb, **tol)
    assert max(float(g.abs().max()) for g in a) > 1e-6


def test_cuda_graphs_off_cuda_warn_and_run_eager():
    eager = make()
    with pytest.warns(UserWarning, match="without CUDA graphs"):
        graphs = make(cuda_graphs=True)
    assert "_fast" not in graphs.bundle.__dict__        # nothing compiled, nothing captured on the CPU
    plan = eager.plan(0)
    assert_close(grads(graphs, plan), grads(eager, plan), rtol=0, atol=0)


def test_cuda_graphs_need_inductor_or_no_compile_backend():
    with pytest.raises(ValueError, match="cuda_graphs works with compile_prefix 'inductor'"):
        DraftConfig(cuda_graphs=True, compile_prefix="aot_eager").validate()
    DraftConfig(cuda_graphs=True, compile_prefix="inductor").validate()
    DraftConfig(cuda_graphs=True).validate()


class StaticBuffer:
    """What a CUDA-graph replay returns: the same output tensor every call, overwritten by the next replay."""

    def __init__(self, model):
        self.model, self.out, self.calls = model, None, 0

    def __call__(self, x, sigma, **extra):
        self.calls += 1
        value = self.model(x, sigma, **extra)
        if self.out is None or self.out.shape != value.shape:
            self.out = torch.empty_like(value)
        return self.out.copy_(value)


def test_cuda_graphs_plumbing_on_a_cuda_bundle(monkeypatch):
    """On a CUDA bundle, cuda_graphs compiles the prefix in reduce-overhead mode (with inductor) or with the
    cudagraphs backend (alone); every replay starts a new graph-tree step and its output is copied out of the static
    buffer, so the trainer's gradient is the eager one."""
    compiled, steps = [], []
    monkeypatch.setattr(bundle_mod.torch, "compile",
                        lambda model, **kw: compiled.append(kw) or StaticBuffer(model))
    monkeypatch.setattr(bundle_mod.torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    eager, graphs = make(), make()
    b = graphs.bundle
    b.device = torch.device("cuda")             # what compile_prefix reads; the toy itself stays on the CPU
    b.compile_prefix("inductor", cuda_graphs=True)
    assert compiled[-1] == {"backend": "inductor", "mode": "reduce-overhead", "dynamic": False}
    b.compile_prefix(None, cuda_graphs=True)
    assert compiled[-1] == {"backend": "cudagraphs", "dynamic": False}
    b.device = torch.device("cpu")
    plan = eager.plan(0)
    assert_close(grads(graphs, plan), grads(eager, plan), rtol=0, atol=0)
    assert b._fast.fast.calls == len(steps) == N - 2      # the no-grad prefix replayed, each call a new step

    with torch.no_grad():                        # two replays: the first output survives the second
        x = torch.randn(2, 2, 2, 2)
        sigma = torch.full((2,), 3.0)
        cond = {"cond": torch.randn(2, 4)}
        first = b._fast(x, sigma, **cond)
        kept = first.clone()
        b._fast(x * 2, sigma, **cond)
    torch.testing.assert_close(first, kept, rtol=0, atol=0)


def test_bf16_autocast_reaches_the_prefix_the_grad_step_and_its_recomputation():
    """The trainer enables autocast only on CUDA (amp_dtype is None on CPU); set as on CUDA, bf16 autocast covers
    every denoiser call, the checkpoint recomputes the grad step in backward under the same autocast (so the
    gradient equals the one without checkpointing), LoRA gradients stay fp32, and they agree with fp32 to bf16
    accuracy."""
    assert make().amp_dtype is None              # precision="bf16" (the default) on a CPU bundle: plain fp32
    runs = {}
    for name, checkpointing, amp in (("fp32", True, None), ("bf16", True, torch.bfloat16),
                                     ("bf16_no_ckpt", False, torch.bfloat16)):
        tr = make(checkpointing=checkpointing)
        tr.amp_dtype = amp
        seen = []
        tr.bundle.model.net.l1.register_forward_hook(lambda m, i, o: seen.append((torch.is_grad_enabled(), o.dtype)))
        g = grads(tr, tr.plan(0))
        runs[name] = g, seen
    g16, seen16 = runs["bf16"]
    assert {dtype for _, dtype in seen16} == {torch.bfloat16}
    assert [grad for grad, _ in seen16] == [False] * (N - 2) + [True] * 2 * 2   # prefix, grad steps, recomputed
    assert [grad for grad, _ in runs["bf16_no_ckpt"][1]] == [False] * (N - 2) + [True] * 2
    assert all(g.dtype == torch.float32 for g in g16)
    assert_close(g16, runs["bf16_no_ckpt"][0], rtol=1e-5, atol=1e-7)
    g32 = runs["fp32"][0]
    cos = torch.nn.functional.cosine_similarity(torch.cat([g.flatten() for g in g16]),
                                                torch.cat([g.flatten() for g in g32]), dim=0)
    assert cos > 0.99
    assert not all(torch.equal(a, b) for a, b in zip(g16, g32))   # bf16 really ran
