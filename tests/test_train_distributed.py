"""Data parallel `rewardlab train` as torchrun runs it: two gloo ranks on the embedded tiny model (tests/_dist_train.py
gives each rank torchrun's environment), against one process that accumulates the same micro-batches
(grad_accum = 2). The job trains two steps, then resumes to a third."""
import json
import os
import socket
import sys

import torch
import torch.multiprocessing as mp

from rewardlab.cli import build_parser
from rewardlab.rewards import load_reward
from rewardlab.training.checkpoints import load_lora_file
from rewardlab.training.cli import build
from rewardlab.training.draft import DraftConfig, Trainer

sys.path.insert(0, os.path.dirname(__file__))   # pytest runs with --import-mode=importlib
from _dist_train import rank_main  # noqa: E402
from _train_fixtures import TARGETS, reward, toy_bundle  # noqa: E402

ARGS = ["--device", "cpu", "--reward", "colourfulness", "--steps", "2", "--batch-size", "1", "--precision", "fp32",
        "--save-every", "0", "--rank", "2", "--lr", "1e-2", "--seed", "3"]
FILES = ["dp.safetensors", "dp_after.png", "dp_before.png", "dp_curve.png", "dp_log.json",
         os.path.join("rewardlab_state", "dp.state.pt")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_ranks(logs, out):
    """Two ranks with torchrun's environment, forked from this process (see tests/_dist_train.py)."""
    argv = [*ARGS, "--out", str(out), "--name", "dp"]
    mp.start_processes(rank_main, args=(free_port(), str(logs), argv), nprocs=2, join=True, start_method="fork")


def single_process_reference():
    """One thread, as each rank runs: the same reduction order inside every matrix product."""
    args = build_parser().parse_args(["train", *ARGS, "--grad-accum", "2", "--train-steps", "3"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bundle, config, prompts, heldout = build(args)
        trainer = Trainer(bundle, load_reward(args.reward), config, prompts=prompts, heldout=heldout)
        trainer.train()
    finally:
        torch.set_num_threads(threads)
    return trainer


def test_two_ranks_train_and_resume_like_one_process_accumulating_their_micro_batches(tmp_path):
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    ref = single_process_reference()      # first: the forked ranks then inherit the imported diffusers
    launch_two_ranks(logs, out)

    # the LoRA after 2 steps + a resumed third equals 3 uninterrupted steps of one process with grad_accum = 2
    lora = load_lora_file(str(out / "dp.safetensors"))
    expected = ref.lora_state_dict()
    assert lora.keys() == expected.keys() and len(lora) > 0
    for k in expected:
        torch.testing.assert_close(lora[k], expected[k], rtol=1e-5, atol=1e-7, msg=k)
    assert any(float(v.abs().max()) > 0 for k, v in lora.items() if "lora_up" in k)     # it did train

    # the logged reward and loss are the means over both ranks' micro-batches, the whole global batch
    log = json.loads((out / "dp_log.json").read_text())["log"]
    assert [r["step"] for r in log] == [1, 2, 3]
    for mine, theirs in zip(log, ref.log):
        assert abs(mine["reward"] - theirs["reward"]) < 1e-6 and abs(mine["loss"] - theirs["loss"]) < 1e-6

    # one set of files, all written by rank 0; only rank 0 printed
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == sorted(FILES)
    rank0 = set(json.loads((logs / "rank0.writes.json").read_text()))
    assert set(FILES) <= rank0
    assert json.loads((logs / "rank1.writes.json").read_text()) == []
    printed0, printed1 = (logs / "rank0.out").read_text(), (logs / "rank1.out").read_text()
    assert "step    1" in printed0 and "step    3" in printed0 and "resumed" in printed0
    assert printed0.count("reward before") == 2
    assert printed1 == ""


def test_lora_init_comes_from_the_seed_and_leaves_the_global_rng_alone():
    """Every rank builds its own adapters: they start equal because the init is drawn from config.seed."""
    def downs(seed, draws=0):
        bundle = toy_bundle()             # (seeds the global RNG itself, for its network)
        torch.rand(draws)                 # a different global RNG state when draws > 0
        state = torch.random.get_rng_state()
        trainer = Trainer(bundle, reward, DraftConfig(targets=TARGETS, seed=seed, steps=2), prompts=["a"])
        assert torch.equal(torch.random.get_rng_state(), state)
        return torch.cat([a.down.flatten() for a in trainer.adapters.values()])

    first = downs(5)
    assert torch.equal(downs(5, draws=3), first) and not torch.equal(downs(6), first)
