"""Checkpoints and failure handling of the DRaFT trainer: exact resume, NaN / OOM / cancel keep the last good
checkpoint and free memory, a checkpoint is written only once a finite loss vouches for its weights, resume refuses
other settings with the fix, early stopping, and data parallelism (gloo, 2 processes)."""
import os
import sys

import pytest
import torch

from rewardlab.training import checkpoints as ckpt
from rewardlab.training.draft import DraftConfig, Trainer, TrainingStopped
from rewardlab.training.lora import lora_state_dict

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _train_fixtures import TARGETS, reward, toy_bundle  # noqa: E402

PROMPTS = ["a red", "a blue", "a green", "a cat", "a dog"]


def config(**kw):
    base = dict(method="draft_lv", steps=4, batch_size=2, cfg=2.0, rank=2, targets=TARGETS, scheduler="karras",
                seed=7, lr=1e-2)
    base.update(kw)
    return DraftConfig(**base)


def trainer(path=None, reward_fn=reward, **kw):
    return Trainer(toy_bundle(), reward_fn, config(**kw), prompts=PROMPTS, lora_path=path)


def lora_of(tr):
    return lora_state_dict(tr.adapters)


@pytest.mark.parametrize("method", ["draft_lv", "alignprop"])
def test_resume_equals_uninterrupted_run(tmp_path, method):
    full = trainer(method=method, k=4)
    full.train(steps=6)
    path = str(tmp_path / "run.safetensors")
    first = trainer(path, method=method, k=4)
    first.train(steps=3)
    resumed = trainer(path, method=method, k=4).resume()       # a fresh process: new bundle, new LoRA init
    assert resumed.step == 3
    resumed.train(steps=6)
    a, b = lora_of(full), lora_of(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    assert any(float(a[k].abs().max()) > 0 for k in a if "lora_up" in k)     # it trained
    assert [r["reward"] for r in full.log] == pytest.approx([r["reward"] for r in resumed.log], abs=1e-6)
    # the checkpoint is a ComfyUI-format LoRA plus a weights_only-loadable state
    sd, state = ckpt.load_checkpoint(path)
    assert all(k.startswith("diffusion_model.") for k in sd) and state["step"] == 6


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    path = str(tmp_path / "run.safetensors")
    trainer(path).train(steps=1)
    with pytest.raises(ValueError, match="seed=7, but this run asks for seed=8; resume with the settings"):
        trainer(path, seed=8).resume()


class Faulty:
    """The toy reward, failing at the n-th call with ``error`` (or returning NaN)."""

    def __init__(self, at, error=None):
        self.at, self.error, self.calls = at, error, 0

    def __call__(self, images, prompts):
        self.calls += 1
        r = reward(images, prompts)
        if self.calls == self.at:
            if self.error is not None:
                raise self.error
            return r * float("nan")
        return r


def run_until_failure(tmp_path, fault, save_every=2, **kw):
    """Train until ``fault`` stops it; returns (trainer, path, frees, error, {step: LoRA after that step})."""
    path = str(tmp_path / "run.safetensors")
    freed, weights = [], {0: None}
    tr = Trainer(toy_bundle(), fault, config(method="draft_k", save_every=save_every, **kw), prompts=PROMPTS,
                 lora_path=path, free_memory=lambda: freed.append(True),
                 on_step=lambda rec, t: weights.update({rec["step"]: {k: v.clone() for k, v in lora_of(t).items()}}))
    with pytest.raises(TrainingStopped) as info:
        tr.train(steps=10)
    return tr, path, freed, info.value, weights


def assert_checkpoint_holds(path, weights, step):
    sd, state = ckpt.load_checkpoint(path)
    assert state["step"] == step
    for k in sd:
        assert torch.isfinite(sd[k]).all()
        torch.testing.assert_close(sd[k], weights[step][k], rtol=0, atol=0)


def test_nan_loss_at_a_known_step_keeps_the_last_vouched_checkpoint_and_resume_continues(tmp_path):
    # The 5th reward call is step 5's loss, computed with the weights of step 4: NaN. Those weights are what failed,
    # so the step-4 checkpoint (taken, not yet vouched for) is dropped; step 2's was vouched for by step 3's loss.
    tr, path, freed, err, weights = run_until_failure(tmp_path, Faulty(at=5))
    assert_checkpoint_holds(path, weights, 2)
    assert err.reason == "nan" and err.step == 4 and freed == [True] and err.checkpoint == path
    assert "NaN/Inf at step 5" in str(err) and "learning rate" in str(err)
    assert f"the last good checkpoint is {path} (step 2); resume continues from it" in str(err)
    assert all(p.grad is None for p in tr.params)
    resumed = trainer(path, method="draft_k", save_every=2).resume()
    assert resumed.step == 2
    assert resumed.train(steps=5).step == 5 and ckpt.load_checkpoint(path)[1]["step"] == 5


def test_a_diverged_update_never_becomes_the_last_good_checkpoint(tmp_path):
    """The issue's `rewardlab train --lr 1e6 --max-grad-norm 0 --save-every 1` on the tiny model: step 1's loss is
    finite, its update leaves finite but ±1e6 weights, and step 2's loss is NaN. Before, the step-1 file was named
    the last good checkpoint and sampled non-finite images; now nothing of the diverged run is written, and the
    message says so."""
    from rewardlab.rewards import load_reward
    from rewardlab.training.bundle import tiny_bundle

    path = str(tmp_path / "draft_lora.safetensors")
    cfg = DraftConfig(method="draft_k", k=1, steps=3, scheduler="simple", cfg=3.0, batch_size=2, lr=1e6,
                      max_grad_norm=0, rank=2, targets=None, save_every=1, seed=0)
    tr = Trainer(tiny_bundle(), load_reward("colourfulness"), cfg, prompts=["a red circle on a blue background"],
                 lora_path=path)
    with pytest.raises(TrainingStopped) as info:
        tr.train(steps=4)
    assert not os.path.exists(path) and not os.path.exists(tr.state_path)
    assert info.value.reason == "nan" and info.value.step == 1 and "NaN/Inf at step 2" in str(info.value)
    assert "no checkpoint was kept" in str(info.value) and info.value.checkpoint is None
    # a run that ends right after the diverged update: the final LoRA is checked too, and not written
    last = Trainer(tiny_bundle(), load_reward("colourfulness"), cfg, prompts=["a red circle"], lora_path=path)
    with pytest.raises(TrainingStopped, match="the LoRA after the last step \\(step 1\\) gives a NaN/Inf loss"):
        last.train(steps=1)
    assert not os.path.exists(path)
    # the same run at a sane learning rate: its checkpoint samples finite images and resume continues from it
    cfg.lr = 1e-3
    good = Trainer(tiny_bundle(), load_reward("colourfulness"), cfg, prompts=["a red circle"], lora_path=path)
    good.train(steps=2)
    again = Trainer(tiny_bundle(), load_reward("colourfulness"), cfg, prompts=["a red circle"], lora_path=path).resume()
    images, _ = again.sample_images(["a red circle"])
    assert again.step == 2 and torch.isfinite(images).all()


def test_out_of_memory_stops_cleanly_and_names_the_fix(tmp_path):
    oom = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    tr, path, freed, err, weights = run_until_failure(tmp_path, Faulty(at=3, error=oom), batch_size=3)
    assert err.reason == "oom" and freed == [True]
    assert "lower batch_size (now 3)" in str(err) and "checkpointing" in str(err) and "step 2" in str(err)
    assert_checkpoint_holds(path, weights, 2)        # taken after step 2, vouched for by a no-grad loss on the stop
    assert all(p.grad is None for p in tr.params)


def test_cancel_stops_cleanly(tmp_path):
    path = str(tmp_path / "run.safetensors")
    steps_seen = []
    tr = Trainer(toy_bundle(), reward, config(method="draft_k", save_every=1), prompts=PROMPTS, lora_path=path,
                 on_step=lambda rec, t: steps_seen.append(rec["step"]), cancel=lambda: len(steps_seen) >= 2)
    with pytest.raises(TrainingStopped) as info:
        tr.train(steps=10)
    assert info.value.reason == "cancelled" and tr.step == 2
    assert_checkpoint_holds(path, {2: lora_of(tr)}, 2)


def test_early_stop_when_heldout_reward_stops_improving():
    tr = Trainer(toy_bundle(), reward, config(method="draft_k", heldout_every=1, early_stop_patience=2),
                 prompts=PROMPTS, heldout=["held out"])
    scores = iter([0.5, 0.7, 0.6, 0.65, 0.9])
    tr.evaluate = lambda *a, **k: next(scores)
    result = tr.train(steps=10)
    assert result.status == "early_stopped" and result.step == 4 and result.best_heldout == 0.7
    assert [r["heldout_reward"] for r in result.log] == [0.5, 0.7, 0.6, 0.65]


def test_gradient_accumulation_averages_micro_batches():
    one = Trainer(toy_bundle(), reward, config(method="draft_k", grad_accum=2), prompts=PROMPTS)
    plans = [one.plan(0, m) for m in range(2)]
    with torch.no_grad():
        for a in one.adapters.values():
            a.up.normal_(0, 0.3, generator=torch.Generator().manual_seed(0))
    expected = [sum(g) / 2 for g in zip(*(torch.autograd.grad(one.loss(p)[0], one.params) for p in plans))]
    captured = []
    one.opt.step = lambda: captured.append([p.grad.clone() for p in one.params])
    one.cfg.max_grad_norm = 0
    one.train_step()
    for a, b in zip(captured[0], expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_unsafe_lora_names_are_refused_and_good_ones_stay_inside_the_output_folder(tmp_path):
    root = str(tmp_path / "out")
    for bad in ("../../x", "/etc/passwd", "..", "", "   "):
        with pytest.raises(ValueError):
            ckpt.output_lora_path(bad, root=root)
    assert ckpt.output_lora_path("my_lora.safetensors", root=root) == os.path.join(root, "loras", "my_lora.safetensors")
    assert ckpt.output_lora_path("styles/cat", root=root) == os.path.join(root, "loras", "styles", "cat.safetensors")
    assert not os.listdir(root) or os.listdir(root) == ["loras"]


# --- data parallel ------------------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, out):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        tr = Trainer(toy_bundle(), reward, config(method="draft_k", k=2), prompts=PROMPTS)
        tr.train(steps=3)
        torch.save(lora_state_dict(tr.adapters), os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_data_parallel_two_gloo_ranks_equal_one_process_accumulating(tmp_path):
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # fork: the children reuse the imported torch (spawn would re-import it, ~4 s of CPU per process)
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    torch.manual_seed(0)
    single = Trainer(toy_bundle(), reward, config(method="draft_k", k=2, grad_accum=2), prompts=PROMPTS)
    single.train(steps=3)
    ref = lora_state_dict(single.adapters)
    for k in ref:
        torch.testing.assert_close(r0[k], r1[k], rtol=0, atol=0)          # ranks stay in sync
        torch.testing.assert_close(r0[k], ref[k], rtol=1e-5, atol=1e-6)   # and equal the accumulated run


def test_prompts_are_cycled_in_a_fresh_shuffled_order_each_epoch():
    tr = trainer(batch_size=5)
    epochs = [[tr._prompt(e * 5 + i) for i in range(5)] for e in range(3)]
    assert all(sorted(ep) == sorted(PROMPTS) for ep in epochs)          # every prompt once per epoch
    assert len({tuple(ep) for ep in epochs}) > 1                          # reshuffled between epochs
    ordered = trainer(batch_size=5, shuffle=False)
    assert [ordered._prompt(i) for i in range(7)] == PROMPTS + PROMPTS[:2]
    assert tr.plan(3).prompts == trainer(batch_size=5).plan(3).prompts    # seeded: reproducible


def test_training_uses_a_private_generator_not_the_global_rng():
    tr = trainer(method="alignprop", k=4)
    state = torch.random.get_rng_state()
    tr.train(steps=2)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_status_is_keyed_by_a_run_id_and_a_reused_name_starts_over(tmp_path):
    """Each Trainer reports under its own run id; a second run of the same name drops the first one's status
    (no stale checkpoint or reward from the earlier run)."""
    from rewardlab.training import status

    status.clear()
    first = Trainer(toy_bundle(), reward, config(method="draft_k", save_every=1), prompts=PROMPTS,
                    lora_path=str(tmp_path / "mine.safetensors"), run_name="mine")
    first.train(2)
    old = status.latest("mine")
    assert old["run_id"] == first.run_id and old["step"] == 2 and old["status"] == "completed"
    assert old["last_checkpoint"].endswith("mine.safetensors")
    second = Trainer(toy_bundle(), reward, config(method="draft_k"), prompts=PROMPTS, run_name="mine")
    assert second.run_id != first.run_id
    second.train(1)
    runs = status.snapshot()
    assert list(runs) == [second.run_id]
    new = status.latest("mine")
    assert new["step"] == 1 and new.get("last_checkpoint") is None and new["started"] > old["started"]
    status.clear()


# --- resume: refusals that name the fix, legacy state, learning rate ------------------------------------------------

def test_resume_with_other_targets_names_the_setting_instead_of_an_optimizer_error(tmp_path):
    """Issue 14: resuming with different `targets` failed inside torch with an optimizer param-group mismatch."""
    path = str(tmp_path / "run.safetensors")
    trainer(path).train(steps=1)
    with pytest.raises(ValueError) as info:
        trainer(path, targets=("l1", "l2")).resume()
    message = str(info.value)
    assert "targets=['l1', 'l2', 'l3']" in message and "asks for targets=['l1', 'l2']" in message
    assert "resume with the settings it was trained with, or train under a new name" in message
    with pytest.raises(ValueError, match="rank=2, but this run asks for rank=3"):
        trainer(path, rank=3).resume()


def test_resume_of_a_bare_lora_with_other_modules_is_a_clear_error(tmp_path):
    path = str(tmp_path / "bare.safetensors")
    tr = trainer(path)
    ckpt.save_lora_file({k: v for k, v in lora_of(tr).items() if ".l3." not in k}, path)   # no state: a bare LoRA
    with pytest.raises(ValueError, match="no weights for 3 of this run's entries .* rank and targets"):
        trainer(path).resume()


class Payload:
    def __reduce__(self):
        return (os.system, ("echo unsafe",))


class NeedsAClass:
    pass


@pytest.mark.parametrize("payload, names", [(Payload(), "posix.system"), (NeedsAClass(), "NeedsAClass")])
def test_resume_from_a_malicious_state_refuses_without_torch_advice(tmp_path, payload, names):
    """Issue 14: torch's UnpicklingError reached the user, with its advice to set weights_only=False."""
    path = str(tmp_path / "run.safetensors")
    tr = trainer(path)
    tr.train(steps=1)
    torch.save({"step": 1, "optimizer": {}, "x": payload}, tr.state_path)
    with pytest.raises(ValueError) as info:
        trainer(path).resume()
    message = str(info.value)
    assert "refused to load the training state" in message and names in message and "train under a new name" in message
    assert "weights_only" not in message and "\x1b" not in message and "if you trust" not in message
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_state_lives_outside_the_lora_folder_and_an_old_one_is_moved_on_resume(tmp_path):
    """Issue 14: *.state.pt beside the LoRA showed up in ComfyUI's LoRA list."""
    path = str(tmp_path / "loras" / "run.safetensors")
    first = trainer(path, save_every=2)
    first.train(steps=2)
    assert sorted(os.listdir(tmp_path / "loras")) == ["rewardlab_state", "run.safetensors"]
    assert first.state_path == str(tmp_path / "loras" / "rewardlab_state" / "run.state.pt")
    legacy = str(tmp_path / "loras" / "run.state.pt")               # where earlier versions wrote it
    os.replace(first.state_path, legacy)
    resumed = trainer(path).resume()
    assert resumed.step == 2 and not os.path.exists(legacy) and os.path.exists(first.state_path)


def test_resume_uses_this_runs_learning_rate(tmp_path):
    """The advice after a NaN is 'lower the learning rate': a resume must not bring the old one back."""
    path = str(tmp_path / "run.safetensors")
    trainer(path, lr=1e-2).train(steps=1)
    resumed = trainer(path, lr=1e-4).resume()
    assert [g["lr"] for g in resumed.opt.param_groups] == [1e-4]


def test_resume_is_exact_even_if_a_crash_fell_between_the_state_and_the_lora(tmp_path):
    """The state is written first and holds its own copy of the LoRA weights."""
    path = str(tmp_path / "run.safetensors")
    tr = trainer(path, save_every=1)
    tr.train(steps=1)
    step1 = ckpt.load_lora_file(path)
    tr.train(steps=2)
    ckpt.save_lora_file(step1, path)                     # as if the LoRA of step 2 never reached the disk
    resumed = trainer(path).resume()
    assert resumed.step == 2
    for k, v in lora_of(tr).items():
        torch.testing.assert_close(lora_of(resumed)[k], v, rtol=0, atol=0)


def test_checkpoint_writes_go_through_unlisted_temporaries_flushed_to_disk(tmp_path, monkeypatch):
    """A crash mid-write leaves at most a '.part' file, which no LoRA loader lists; both files are fsynced."""
    moves, synced = [], []
    real_replace, real_fsync = os.replace, os.fsync
    monkeypatch.setattr(ckpt.os, "replace", lambda a, b: (moves.append((a, b)), real_replace(a, b))[1])
    monkeypatch.setattr(ckpt.os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    path = str(tmp_path / "run.safetensors")
    tr = trainer(path)
    tr.train(steps=1)
    assert [os.path.basename(b) for _, b in moves] == ["run.state.pt", "run.safetensors"]
    assert all(a.endswith(".part") and os.path.dirname(a) == os.path.dirname(b) for a, b in moves)
    assert len(synced) >= 4                                      # each file and its folder
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".part")]


def test_every_checkpoint_of_a_run_goes_to_its_own_state_path(tmp_path):
    """A host keeps the state out of the LoRA folder by passing state_path: intermediate and final saves alike."""
    lora, state = tmp_path / "loras" / "run.safetensors", tmp_path / "rewardlab_state" / "run.state.pt"
    tr = Trainer(toy_bundle(), reward, config(method="draft_k", save_every=2), prompts=PROMPTS, lora_path=str(lora),
                 state_path=str(state))
    tr.train(steps=3)                                                    # step 2 pending -> written, then the final
    assert os.listdir(tmp_path / "loras") == ["run.safetensors"] and ckpt.load_state(str(state))["step"] == 3
    resumed = Trainer(toy_bundle(), reward, config(method="draft_k"), prompts=PROMPTS, lora_path=str(lora),
                      state_path=str(state)).resume()
    resumed.train(steps=4)
    assert os.listdir(tmp_path / "loras") == ["run.safetensors"] and ckpt.load_state(str(state))["step"] == 4
