"""Every GPU measurement of issue 15 in one call, in priority order, within a time budget (run by bench/gpu_run.sh).

Each phase is a bench script in its own process; every JSON line it prints is appended at once, with the phase's
name, to OUT/results.jsonl, so a time limit keeps what was measured before it. Children's other output goes to
OUT/log.txt. A phase that would start with too little time left is recorded as skipped; one that runs past its cap
(or the budget) is stopped and recorded as a timeout.

  --check   (about 3 minutes: a 170 s budget) the install and the CUDA paths: imports and versions, a tiny DRaFT
            step through every prefix lever on the GPU with its agreement to eager, the TRL anchor, ReNO and the
            SDXL/Flux and ComfyUI code paths on tiny shapes, then (if time is left) one SD1.5-shaped UNet forward,
            eager against CUDA graphs
  (full)    (at most 8 minutes: a 430 s budget) the SD1.5 DRaFT-1 step at 512², DDIM 50, B=4 and B=1: RewardLab
            eager, the TRL anchor, RewardLab with compile + CUDA graphs; ReNO (50 iterations, one-step
            SD2.1-shaped, three CLIP-size rewards); the ComfyUI path (when a checkout is there); SDXL- and
            Flux-shaped DRaFT-1 steps at 1024²; RewardLab with one lever at a time; RewardLab's LoRA against
            PEFT's on the UNet (lora_cost.py); ReNO compiled. Then summary rows against the targets.
  --tiny    the same phases on tiny shapes (a dry run; on a machine without CUDA it runs on the CPU)

    python bench/gpu_run.py --check --out OUT
    python bench/gpu_run.py --out OUT
    python bench/gpu_run.py --tiny --out /tmp/dry       # CPU dry run of the full list
"""
import argparse
import json
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = {4: {"s": 1.5, "peak_GiB": 16.0}, 1: {"s": 1.0, "peak_GiB": 16.0}}      # issue 15, DRaFT-1 step
TRL_H100 = {4: {"s": 5.10, "peak_GiB": 22.0}, 1: {"s": 5.86, "peak_GiB": 7.4}}   # the anchor measured before
RENO_TARGET = {"s_per_image": 5.0, "stretch_s": 3.0, "peak_gib": 10.0}
PACKAGES = ("torch", "triton", "diffusers", "transformers", "open_clip_torch", "timm", "trl", "peft", "accelerate",
            "huggingface_hub", "safetensors", "ftfy", "wcwidth")
COMFY_MODULES = ("torchsde", "einops", "scipy", "av", "aiohttp", "psutil", "requests", "yaml")


@dataclass
class Phase:
    name: str
    argv: list
    cap_s: float           # the phase's own time limit
    min_s: float = 20.0    # do not start it with less time left


def bench(script, *args):
    return [sys.executable, os.path.join(HERE, script), *args]


def comfyui_path():
    path = os.environ.get("COMFYUI_PATH") or os.path.join(ROOT, ".comfyui", "ComfyUI")
    return path if os.path.isdir(os.path.join(path, "comfy")) else None


def phases(check, tiny, device):
    """The phases in priority order."""
    dev = ["--device", device]
    t = ["--tiny"] if tiny else []
    cpu = device == "cpu"
    # on the CPU, compile with aot_eager (no C++ toolchain wait); CUDA graphs fall back there (with a warning)
    levers = ["--compile-backend", "aot_eager"] if cpu else []
    draft = ["draft_step.py", *t, *dev, "--ks", "1", "--lv-n", "0", *levers]
    if check:      # inductor once (compile+cudagraphs covers it), then each other script's CUDA path on tiny shapes
        modes = ["eager", "cudagraphs", "compile" if cpu else "compile+cudagraphs"]
        out = [Phase("imports", [sys.executable, os.path.abspath(__file__), "--imports"], 60),
               Phase("draft_levers_tiny", bench(*draft, "--tiny", "--batches", "2", "--reps", "1", "--modes", *modes),
                     120),
               Phase("reno_tiny", bench("reno.py", "--tiny", *dev, "--iterations", "3"), 60),
               Phase("family_tiny", bench("family_step.py", "--tiny", *dev), 60)]
        if comfyui_path():
            out.append(Phase("comfy_tiny", bench("comfy_step.py", "--tiny", *dev, "--batches", "1", "--reps", "1"), 60))
        out.append(Phase("unet_forward", [sys.executable, os.path.abspath(__file__), "--unet-forward", *t, *dev], 90))
        return out
    reps = ["--reps", "1"] if tiny else ["--reps", "2"]
    both = ["--batches", "4", "1"] if not tiny else ["--batches", "2"]
    on = ["compile"] if cpu else ["compile+cudagraphs"]
    single = ["cudagraphs"] if cpu else ["cudagraphs", "compile"]
    out = [Phase("draft_ours_eager", bench(*draft, "--worker", "ours", *both, *reps, "--modes", "eager"), 100),
           Phase("draft_trl", bench(*draft, "--worker", "trl", *both, *reps), 100),
           Phase("draft_ours_levers", bench(*draft, "--worker", "ours", *both, *reps, "--modes", *on), 200, 60),
           Phase("reno_eager", bench("reno.py", *t, *dev, "--compile", "none", "--no-sdxl"), 100, 40)]
    if comfyui_path():
        out.append(Phase("comfy_step", bench("comfy_step.py", *t, *dev, *both, "--reps", "1"), 120, 60))
    out += [Phase("family_steps", bench("family_step.py", *t, *dev), 200, 60),
            Phase("draft_ours_single_levers", bench(*draft, "--worker", "ours", *both, *reps, "--modes", *single),
                  200, 60),
            Phase("lora_cost", bench("lora_cost.py", *t, *dev, "--latent", "8" if tiny else "64", "--batch", "4"),
                  60, 30),
            Phase("reno_compiled", bench("reno.py", *t, *dev, "--compile", "aot_eager" if cpu else "reduce-overhead",
                                         "--skip-baseline", "--no-sdxl"), 200, 90)]
    return out


class Recorder:
    def __init__(self, out_dir):
        os.makedirs(out_dir, exist_ok=True)
        self.results = os.path.join(out_dir, "results.jsonl")
        self.log = os.path.join(out_dir, "log.txt")

    def row(self, **kw):
        line = json.dumps(kw)
        with open(self.results, "a", encoding="utf-8") as f:
            f.write(line + "\n")
        print(line, flush=True)

    def rows(self):
        if not os.path.exists(self.results):
            return []
        with open(self.results, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]


def _pump(stream, q):
    for line in iter(stream.readline, ""):
        q.put(line)
    q.put(None)


def run_phase(phase, rec, deadline):
    """Run one phase, streaming its JSON lines into the results; returns its status."""
    left = deadline - time.monotonic()
    if left < phase.min_s:
        rec.row(what="phase", phase=phase.name, status="skipped", reason=f"{left:.0f} s left of the budget")
        return "skipped"
    limit = min(phase.cap_s, left)
    t0 = time.monotonic()
    with open(rec.log, "a", encoding="utf-8") as log:
        log.write(f"\n===== {phase.name}: {' '.join(phase.argv)}\n")
        log.flush()
        proc = subprocess.Popen(phase.argv, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT,
                                start_new_session=True)
        q = queue.Queue()
        threading.Thread(target=_pump, args=(proc.stdout, q), daemon=True).start()
        status, tail = None, []
        while status is None:
            try:
                line = q.get(timeout=max(0.0, t0 + limit - time.monotonic()))
            except queue.Empty:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                status = "timeout"
                break
            if line is None:
                status = "ok" if proc.wait() == 0 else "failed"
                break
            if line.startswith("{"):
                try:
                    rec.row(phase=phase.name, **json.loads(line))
                    continue
                except json.JSONDecodeError:
                    pass
            log.write(line)
            tail = (tail + [line])[-20:]
    row = dict(what="phase", phase=phase.name, status=status, s=round(time.monotonic() - t0, 1), limit_s=limit)
    if status != "ok":
        row["rc"] = proc.returncode
        row["log_tail"] = _log_tail(rec.log, 1500)
    rec.row(**row)
    return status


def _log_tail(path, n):
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()[-n:]


def _version(name):
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def environment_row():
    import importlib.util
    import torch
    info = dict(what="environment", python=platform.python_version(), torch=torch.__version__,
                cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available()
                else None, gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                gpu_GiB=torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None,
                cpus=os.cpu_count(), packages={p: _version(p) for p in PACKAGES},
                comfyui=comfyui_path(), comfy_modules={m: importlib.util.find_spec(m) is not None
                                                       for m in COMFY_MODULES})
    try:
        info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                             "--format=csv,noheader"], capture_output=True, text=True,
                                            timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["nvidia_smi"] = None
    info["commit"] = os.environ.get("GIT_COMMIT") or _git_commit()
    return info


def _git_commit():
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def imports_check():
    """Import what the phases import, and say what failed (a child process: a crash here costs nothing else)."""
    for name in ("diffusers", "open_clip", "transformers", "trl.models.modeling_sd_base", "peft", "accelerate",
                 "rewardlab.training.draft", "rewardlab.noise"):
        t0 = time.perf_counter()
        try:
            __import__(name)
            print(json.dumps(dict(what="import", module=name, ok=True, s=time.perf_counter() - t0)), flush=True)
        except Exception as e:  # noqa: BLE001 — report every failure, go on
            print(json.dumps(dict(what="import", module=name, ok=False, error=repr(e)[:300])), flush=True)


def unet_forward(tiny, device):
    """One CFG forward of the SD1.5-shaped UNet without grad, at B=1 and 4: eager against CUDA graphs (torch's
    cudagraphs backend) in milliseconds, and their largest difference (bf16)."""
    import torch
    sys.path.insert(0, HERE)
    from draft_step import sd15_unet

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = sd15_unet(tiny).to(dtype).eval().requires_grad_(False)
    side, ctx = unet.config.sample_size, unet.config.cross_attention_dim
    graphs = device.startswith("cuda")
    fast = torch.compile(unet, backend="cudagraphs", dynamic=False) if graphs else None

    def ms(fn, n=10):
        fn()
        fn()
        times = []
        for _ in range(n):
            if graphs:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if graphs:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return 1000 * sorted(times)[n // 2]

    for batch in (1, 4):
        x = torch.randn(2 * batch, 4, side, side, device=device, dtype=dtype)
        t = torch.full((2 * batch,), 500.0, device=device)
        emb = torch.randn(2 * batch, 77, ctx, device=device, dtype=dtype)
        with torch.no_grad():
            ref = unet(x, t, emb).sample
            row = dict(what="unet_cfg_forward", B=batch, device=device, tiny=tiny, eager_ms=ms(lambda: unet(x, t, emb)))
            if fast is not None:
                def replay():
                    torch.compiler.cudagraph_mark_step_begin()
                    return fast(x, t, emb).sample.clone()
                out = replay()
                row.update(cudagraphs_ms=ms(replay),
                           cudagraphs_rel_err=float((out.float() - ref.float()).norm() / ref.float().norm()))
        print(json.dumps(row), flush=True)


def summary(rec, tiny=False):
    """Rows against the targets, from what this run measured (tiny rows only in a tiny run)."""
    rows = [r for r in rec.rows() if r.get("what") in ("rewardlab_step", "trl_anchor_step", "reno", "comfy_step")
            and "error" not in r and "skipped" not in r and bool(r.get("tiny")) == tiny]
    for batch in sorted({r["B"] for r in rows if "B" in r}, reverse=True):
        ours = {r["mode"]: r for r in rows if r["what"] == "rewardlab_step" and r.get("B") == batch
                and r.get("K") == 1 and r.get("method") == "draft_k" and "fell_back" not in r}
        trl = next((r for r in rows if r["what"] == "trl_anchor_step" and r.get("B") == batch), None)
        comfy = next((r for r in rows if r["what"] == "comfy_step" and r.get("B") == batch), None)
        if not ours:
            continue
        best = min(ours.values(), key=lambda r: r["min_s"])
        row = dict(what="summary_draft1", B=batch, best_mode=best["mode"], best_s=best["min_s"],
                   best_peak_GiB=best["peak_GiB"], modes={m: dict(s=r["min_s"], peak_GiB=r["peak_GiB"], prefix_rel_err=r.get("prefix_rel_err"))
                          for m, r in ours.items()})
        if trl is not None:
            row.update(trl_s=trl["min_s"], trl_peak_GiB=trl["peak_GiB"], speedup_vs_trl=trl["min_s"] / best["min_s"],
                       eager_speedup_vs_trl=trl["min_s"] / ours["eager"]["min_s"] if "eager" in ours else None,
                       memory_ratio_vs_trl=best["peak_GiB"] / trl["peak_GiB"])
        if comfy is not None and "eager" in ours:
            row.update(comfy_s=comfy["min_s"], comfy_peak_GiB=comfy["peak_GiB"],
                       comfy_over_standalone_s=comfy["min_s"] / ours["eager"]["min_s"])
        if batch in TARGETS and not tiny:
            target = TARGETS[batch]
            row.update(target_s=target["s"], target_peak_GiB=target["peak_GiB"], meets_time=best["min_s"] <= target["s"],
                       meets_memory=best["peak_GiB"] <= target["peak_GiB"], trl_h100_before=TRL_H100[batch])
        rec.row(**row)
    reno = [r for r in rows if r["what"] == "reno" and r.get("row") == "rewardlab"]
    if reno:
        best = min(reno, key=lambda r: r["s_per_image"])
        row = dict(what="summary_reno", best_compile=best.get("compile"), s_per_image=best["s_per_image"],
                   peak_gib=best["peak_gib"])
        if not tiny:
            row.update(meets_time=best["s_per_image"] <= RENO_TARGET["s_per_image"],
                       meets_stretch=best["s_per_image"] <= RENO_TARGET["stretch_s"],
                       meets_memory=best["peak_gib"] <= RENO_TARGET["peak_gib"])
        rec.row(**row)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="the short install and CUDA-path check")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes in every phase (dry run)")
    ap.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "out", "gpu_run"))
    ap.add_argument("--budget-s", type=float, default=None, help="default: 170 with --check, 430 without")
    ap.add_argument("--only", nargs="+", default=None, help="run only these phases (names as in results.jsonl)")
    ap.add_argument("--imports", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--unet-forward", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.imports:
        return imports_check()
    if args.unet_forward:
        return unet_forward(args.tiny, device)
    rec = Recorder(args.out)
    budget = args.budget_s or (170.0 if args.check else 430.0)
    deadline = time.monotonic() + budget
    rec.row(**environment_row(), run="check" if args.check else "full", tiny=args.tiny, device=device,
            budget_s=budget)
    for phase in phases(args.check, args.tiny, device):
        if args.only is None or phase.name in args.only:
            run_phase(phase, rec, deadline)
    summary(rec, args.tiny)


if __name__ == "__main__":
    main()
