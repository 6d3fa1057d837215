"""``rewardlab run WORKFLOW --server URL ...``: batch-run a saved workflow on a ComfyUI server."""
import argparse
import asyncio
import json
import os
import sys

import aiohttp

from .client import ComfyClient, RetryPolicy, ServerUnavailable
from .convert import WorkflowError, is_api_format, load_workflow, to_api
from .runner import BatchRunner
from .sweep import SweepError, expand_runs, parse_assignment, read_runs_file

EPILOG = """examples:
  rewardlab run workflow.json --server http://127.0.0.1:8188 --set 3.seed=1..8 --set "KSampler.cfg=[3,5,7]"
  rewardlab run wf.json --server URL --set 'Positive.text=["a cat","a dog"]' --set seed=1..2 --zip
  rewardlab run wf.json --server URL --runs runs.csv --concurrency 4 --out out/ --score brightness
TARGET is NODE.input (NODE = node id or title) or a bare input name; VALUES is a value, a range a..b[:step]
or a JSON list. A rerun with the same --out skips runs that already finished."""


def add_run_subcommand(subparsers):
    p = subparsers.add_parser("run", help="batch-run a saved ComfyUI workflow on a server (sweeps, resume)",
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


def add_run_arguments(p):
    p.add_argument("workflow", help="workflow file: editor JSON, API JSON, or a ComfyUI PNG")
    p.add_argument("--server", required=True, help="ComfyUI server URL, e.g. http://127.0.0.1:8188")
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
    p.add_argument("--concurrency", type=int, default=2, help="prompts queued on the server at once (default 2)")
    p.add_argument("--out", default="rewardlab_batch", help="output folder: images, manifest.jsonl, report")
    p.add_argument("--score", metavar="REWARD", help="rank the output images with this reward model (e.g. "
                   "brightness, aesthetic-v2) and write report.html")
    p.add_argument("--reward-folder", help="folder with reward weights for --score (also $REWARDLAB_MODELS)")
    p.add_argument("--retries", type=int, default=10, help="tries per request while the server is down")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per run (default: no limit)")
    p.add_argument("--poll", type=float, default=2.0, help="seconds between /history checks (websocket backup)")
    p.add_argument("--dry-run", action="store_true", help="print the runs (parameters and keys) and exit")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


async def fetch_object_info(server, retry):
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        return await ComfyClient(server, session, "rewardlab-info", retry).object_info()


def prepare_runs(args, workflow, object_info):
    prompt = to_api(workflow, object_info)
    assignments = [parse_assignment(a) for a in args.assignments or []]
    rows = read_runs_file(args.runs) if args.runs else None
    return expand_runs(prompt, assignments, rows, args.mode, object_info)


def run_main(args):
    """Entry of ``rewardlab run``; returns the exit status (0 all runs succeeded, 1 some failed, 2 bad input
    or unreachable server, 130 interrupted)."""
    try:
        return _run(args)
    except (WorkflowError, SweepError, ServerUnavailable, OSError) as e:
        print(f"rewardlab run: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ninterrupted; finished runs are in {os.path.join(args.out, 'manifest.jsonl')}", file=sys.stderr)
        return 130


def _run(args):
    retry = RetryPolicy(attempts=max(1, args.retries))
    workflow = load_workflow(args.workflow)
    object_info = None
    if not (args.dry_run and is_api_format(workflow)):
        object_info = asyncio.run(fetch_object_info(args.server, retry))
    runs = prepare_runs(args, workflow, object_info)
    if args.dry_run:
        for run in runs:
            print(run.key, json.dumps(run.params))
        return 0
    runner = BatchRunner(args.server, args.out, concurrency=args.concurrency, retry=retry,
                         poll_interval=args.poll, run_timeout=args.timeout,
                         progress=False if args.no_progress else None)
    records = asyncio.run(runner.run(runs))
    ok = sum(r["status"] == "success" for r in records)
    print(f"{ok}/{len(records)} runs succeeded; manifest: {runner.manifest.path}")
    if args.score:
        from .report import score_records, write_report

        scored = score_records(records, runner.out_dir, args.score, folder=args.reward_folder)
        path = write_report(runner.out_dir, scored, args.score)
        if scored:
            print(f"best {args.score} = {scored[0]['score']:.4f}: {scored[0]['path']} {json.dumps(scored[0]['params'])}")
        print(f"report: {path}")
    return 0 if ok == len(records) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="rewardlab-run")
    add_run_arguments(parser)
    return run_main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
