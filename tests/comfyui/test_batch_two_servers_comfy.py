"""``rewardlab run`` over two real ComfyUI servers, one killed mid-sweep: every run finishes, none runs twice on the
server that stays, and one manifest names the server of each run."""
import json
import threading
import time
from pathlib import Path

from rewardlab.batch import cli
from rewardlab.batch.runner import Manifest

from .conftest import CLIP_FILE, UNET_FILE, VAE_FILE, start_server, stop_server


def tiny_prompt():
    """UNET/CLIP/VAE loaders (download-free fixtures) -> KSampler (2 steps, 64 px) -> SaveImage."""
    def link(node, out=0):
        return [str(node), out]
    nodes = {
        1: ("UNETLoader", {"unet_name": UNET_FILE, "weight_dtype": "default"}),
        2: ("CLIPLoader", {"clip_name": CLIP_FILE, "type": "stable_diffusion"}),
        3: ("CLIPTextEncode", {"text": "a red square on a blue background", "clip": link(2)}),
        4: ("ConditioningZeroOut", {"conditioning": link(3)}),
        5: ("EmptyLatentImage", {"width": 64, "height": 64, "batch_size": 1}),
        6: ("KSampler", {"model": link(1), "positive": link(3), "negative": link(4), "latent_image": link(5),
                         "seed": 0, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
                         "denoise": 1.0}),
        7: ("VAELoader", {"vae_name": VAE_FILE}),
        8: ("VAEDecode", {"samples": link(6), "vae": link(7)}),
        9: ("SaveImage", {"images": link(8), "filename_prefix": "rl"}),
    }
    return {str(k): {"class_type": c, "inputs": i, "_meta": {"title": c}} for k, (c, i) in nodes.items()}


def saved_prefixes(server):
    return sorted(p.name.split("_")[0] for p in Path(server.output_dir).glob("*.png"))


def test_a_sweep_over_two_servers_survives_one_being_killed(server, model_files, tmp_path, capsys):
    second = start_server(tmp_path / "second", model_files)
    try:
        wf = tmp_path / "wf.json"
        wf.write_text(json.dumps(tiny_prompt()))
        servers = tmp_path / "servers.txt"
        servers.write_text(f"{server.url} 1\n{second.url} 1\n")
        out = tmp_path / "out"
        seeds = list(range(1, 9))
        args = [str(wf), "--server", str(servers), "--set", f"KSampler.seed={json.dumps(seeds)}",
                "--set", f"SaveImage.filename_prefix={json.dumps([f's{s}' for s in seeds])}", "--zip",
                "--out", str(out), "--no-progress", "--poll", "1", "--give-up", "120", "--timeout", "600"]
        result = {}
        worker = threading.Thread(target=lambda: result.setdefault("code", cli.main(args)))
        worker.start()
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:   # kill the second server while it runs its second prompt
            done = len(second.get_json("/history"))
            running = second.get_json("/queue")["queue_running"]
            if done >= 1 and running:
                break
            time.sleep(0.2)
        second.proc.kill()
        second.proc.wait()
        worker.join(900)
        assert result.get("code") == 0, capsys.readouterr().err
        records = Manifest(str(out)).load()
        with open(out / "manifest.jsonl") as f:
            assert len(f.readlines()) == len(records) == 8            # one manifest, one line per run
        assert all(r["status"] == "success" for r in records.values())
        by_server = {url: sorted(r["params"]["SaveImage.filename_prefix"] for r in records.values()
                                 if r["server"] == url) for url in (server.url, second.url)}
        assert by_server[second.url] and by_server[server.url]      # both served runs before the kill
        on_first = [p for p in saved_prefixes(server) if p in {f"s{s}" for s in seeds}]
        assert sorted(on_first) == by_server[server.url]            # none twice on the server that stayed
        assert set(by_server[second.url]) <= set(saved_prefixes(second))
        err = capsys.readouterr().err
        assert "not answering" in err and second.url.split("://")[1] in err
        with capsys.disabled():
            print(f"\nruns per server: first {by_server[server.url]}, killed {by_server[second.url]}; "
                  f"images on the killed one: {saved_prefixes(second)}")
    finally:
        stop_server(second)
