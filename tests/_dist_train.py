"""One rank of `rewardlab train` as torchrun starts it, for test_train_distributed.py (forked by
torch.multiprocessing, so the children reuse the imported torch and diffusers instead of re-importing them).

``rank_main`` sets the environment torchrun gives its workers (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR=127.0.0.1,
MASTER_PORT), so the rank goes through the CLI's own `_init_distributed`, then runs `rewardlab train` for two
steps, and again with --resume to step three.

Each rank writes what it printed to <log dir>/rank<R>.out, and every file it opened for writing or moved into
place under --out (Python's audit hooks see open, os.open and os.replace) to <log dir>/rank<R>.writes.json.
"""
import contextlib
import json
import os
import sys

import torch


def watch_writes(folder, seen):
    folder = os.path.abspath(folder)

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
                flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        elif event == "os.rename":
            path, writing = args[1], True
        else:
            return
        if writing and isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.abspath(os.fsdecode(path))
            if path.startswith(folder + os.sep):
                seen.append(os.path.relpath(path, folder))
    sys.addaudithook(hook)


def rank_main(rank, port, logs, argv):
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from rewardlab.cli import main as rewardlab

    writes = []
    watch_writes(argv[argv.index("--out") + 1], writes)
    with open(os.path.join(logs, f"rank{rank}.out"), "w") as f, contextlib.redirect_stdout(f):
        rewardlab(["train", *argv, "--train-steps", "2"])
        rewardlab(["train", *argv, "--train-steps", "3", "--resume"])
    torch.distributed.destroy_process_group()
    with open(os.path.join(logs, f"rank{rank}.writes.json"), "w") as f:
        json.dump(writes, f)

