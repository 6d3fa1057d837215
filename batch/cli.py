"""``rewardlab run WORKFLOW --server URL ...``: batch-run a saved workflow on one or more ComfyUI servers."""
import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp

from ..cli import at_least, one_line
from .client import ComfyClient, ServerUnavailable
from .convert import WorkflowError, convert, is_api_format, load_workflow
from .runner import SERVER_RETRY, BatchRunner, parse_servers
from .sweep import SweepError, expand_runs, parse_assignment, read_runs_file

EPILOG = """examples:
  rewardlab run workflow.json --server http://127.0.0.1:8188 --set 3.seed=1..8 --set "KSampler.cfg=[3,5,7]"
  rewardlab run wf.json --server URL --set 'Positive.text=["a cat","a dog"]' --set seed=1..2 --zip
  rewardlab run wf.json --server http://gpu1:8188 --server http://gpu2:8188 --runs runs.csv --out out/
  rewardlab run wf.json --server servers.txt --score brightness      (servers.txt: one 'URL [CONCURRENCY]' a line)
TARGET is NODE.input (NODE = node id or title) or a bare input name; VALUES is a value, a range a..b[:step]
or a JSON list. Runs go to whichever server has room; a server that stops answering hands its runs to the
others. A rerun with the same --out skips runs that already finished."""


def add_run_subcommand(subparsers):
    p = subparsers.add_parser("run", help="batch-run a saved ComfyUI workflow on servers (sweeps, resume)",
                              description=__doc__, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(p)
    p.set_defaults(func=run_command)
    return p


def run_command(args):
    """``func`` of the subcommand: like run_main, but a failing status leaves the process with that exit code
    (the ``rewardlab`` entry point discards return values)."""
    code = run_main(args)
    if code:
        raise SystemExit(code)
    return code


def server_url(text):
    """An argparse ``type``: an http(s) URL with a host."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(text)
        parts.port                              # raises ValueError on a port that is not a number
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not a URL ({e}): give e.g. http://127.0.0.1:8188") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s) URL: give e.g. http://127.0.0.1:8188")
    return text


def server_or_file(text):
    """An argparse ``type``: a server URL, or a file listing servers (one 'URL [CONCURRENCY]' a line)."""
    return text if os.path.isfile(text) else server_url(text)


def add_run_arguments(p):
    p.add_argument("workflow", help="workflow file: editor JSON, API JSON, or a ComfyUI PNG")
    p.add_argument("--server", action="append", required=True, type=server_or_file, metavar="URL|FILE",
                   help="ComfyUI server URL, e.g. http://127.0.0.1:8188 (repeatable), or a file with one "
                        "'URL [CONCURRENCY]' per line")
    p.add_argument("--set", dest="assignments", action="append", default=[], metavar="TARGET=VALUES",
                   help="set an input; a range or list makes a sweep axis (repeatable)")
    p.add_argument("--sweep", dest="assignments", action="append", metavar="TARGET=VALUES",
                   help="same as --set (for readability)")
    p.add_argument("--runs", help="CSV (TARGET columns) or JSONL ({TARGET: value} per line): one run per row")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--product", dest="mode", action="store_const", const="product",
                      help="all combinations of the sweep axes (default)")
    mode.add_argument("--zip", dest="mode", action="store_const", const="zip", help="pair the axes element-wise")
    p.set_defaults(mode="product")
    p.add_argument("--concurrency", type=at_least(1), default=2,
                   help="prompts queued on each server at once, for servers given without one (default 2)")
    p.add_argument("--out", default="rewardlab_batch", help="output folder: images, manifest.jsonl, report")
    p.add_argument("--score", metavar="REWARD", help="rank the output images with this reward model (e.g. "
                   "brightness, aesthetic-v2) and write report.html")
    p.add_argument("--reward-folder", help="folder with reward weights for --score (also $REWARDLAB_MODELS)")
    p.add_argument("--give-up", type=at_least(0.0, float, exclusive=True), default=120.0, metavar="SECONDS",
                   help="end the batch when no server has answered for this long (default 120)")
    p.add_argument("--timeout", type=at_least(0.0, float, exclusive=True), default=None,
                   help="seconds allowed per run (default: no limit)")
    p.add_argument("--poll", type=at_least(0.0, float, exclusive=True), default=2.0,
                   help="seconds between /history checks (websocket backup)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (parameters and keys) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def check_arguments(args):
    """Everything that can be checked before the first request: files and folders named, the sweep syntax, the
    servers, and the --score reward (its name and weight files). Returns the server list; raises ValueError /
    OSError naming the fix (one line, exit status 2)."""
    if not os.path.isfile(args.workflow):
        raise ValueError(f"workflow file {args.workflow!r} does not exist")
    if args.runs and not os.path.isfile(args.runs):
        raise ValueError(f"--runs file {args.runs!r} does not exist")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file, not a folder: choose a folder")
    if args.reward_folder and not os.path.isdir(args.reward_folder):
        raise ValueError(f"--reward-folder {args.reward_folder!r} is not a folder")
    for assignment in args.assignments or []:
        parse_assignment(assignment)            # syntax only; targets are matched once the workflow is known
    if args.score:
        from ..rewards import registry

        if args.score not in registry.list_rewards():
            raise ValueError(f"unknown reward {args.score!r} for --score; choose one of "
                             f"{', '.join(registry.list_rewards())}")
        registry.resolve_files(args.score, folder=args.reward_folder)
    try:
        return parse_servers(args.server, args.concurrency)
    except ValueError as e:
        raise ValueError(f"--server: {e}") from None


def load_score_reward(args):
    """The --score reward, loaded before the sweep starts (a broken weight file fails here, not after the sweep)."""
    from ..rewards import load_reward

    return load_reward(args.score, device="cpu", folder=args.reward_folder) if args.score else None


async def fetch_object_info(servers, give_up):
    """/object_info of the first server that answers, trying them in turn until ``give_up`` seconds pass."""
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=120)
    deadline = time.monotonic() + give_up
    errors = {}
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            for spec in servers:
                try:
                    return await ComfyClient(spec.url, session, "rewardlab-info", SERVER_RETRY).object_info()
                except ServerUnavailable as e:
                    errors[spec.url] = str(e)
            if time.monotonic() >= deadline:
                raise ServerUnavailable(f"no server answered within {give_up:g}s: "
                                        + "; ".join(f"{url}: {err}" for url, err in errors.items()))
            await asyncio.sleep(1.0)


def prepare_runs(args, workflow, object_info):
    """(runs, conversion): the expanded sweep and the conversion (text replacements wait for submission)."""
    conversion = convert(workflow, object_info)
    assignments = [parse_assignment(a) for a in args.assignments or []]
    rows = read_runs_file(args.runs) if args.runs else None
    return expand_runs(conversion.prompt, assignments, rows, args.mode, object_info), conversion


def run_main(args):
    """Entry of ``rewardlab run``; returns the exit status (0 all runs succeeded, 1 some failed, 2 bad input
    or no server answered, 130 interrupted). Every error ends with one line, never a traceback."""
    from ..rewards.weights import RewardWeightsError

    try:
        return _run(args)
    except (WorkflowError, SweepError, ServerUnavailable, OSError, ValueError, LookupError, RewardWeightsError) as e:
        print(f"rewardlab run: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are in {os.path.join(args.out, 'manifest.jsonl')}", file=sys.stderr)
        return 130


def _run(args):
    servers = check_arguments(args)
    reward = None if args.dry_run else load_score_reward(args)
    workflow = load_workflow(args.workflow)
    object_info = None
    if not (args.dry_run and is_api_format(workflow)):
        object_info = asyncio.run(fetch_object_info(servers, args.give_up))
    runs, conversion = prepare_runs(args, workflow, object_info)
    if args.dry_run:
        for run in runs:
            print(run.key, json.dumps(run.params))
        return 0
    needed = {n["class_type"] for run in runs for n in run.prompt.values()}
    runner = BatchRunner(servers, args.out, give_up=args.give_up, poll_interval=args.poll, run_timeout=args.timeout,
                         progress=False if args.no_progress else None, finalize=conversion.final,
                         required_nodes=needed)
    records = asyncio.run(runner.run(runs))
    ok = sum(r["status"] == "success" for r in records)
    per_server = {}
    for r in records:
        if r.get("server"):
            per_server[r["server"]] = per_server.get(r["server"], 0) + (r["status"] == "success")
    where = ", ".join(f"{url} {n}" for url, n in per_server.items())
    print(f"{ok}/{len(records)} runs succeeded{f' ({where})' if len(servers) > 1 else ''}; "
          f"manifest: {runner.manifest.path}")
    if runner.gave_up:
        print(f"rewardlab run: gave up: {runner.gave_up}", file=sys.stderr)
    if args.score:
        from .report import score_records, write_report

        scored = score_records(records, runner.out_dir, reward)
        path = write_report(runner.out_dir, scored, args.score)
        if scored:
            best = scored[0]
            print(f"best {args.score} = {best['score']:.4f}: {best['path']} {json.dumps(best['params'])}")
        print(f"report: {path}")
    if runner.gave_up:
        return 2
    return 0 if ok == len(records) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rewardlab-run")
    add_run_arguments(parser)
    return run_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
