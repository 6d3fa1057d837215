"""The batch runner, workflow conversion, the stock-node table and the routes against a real headless ComfyUI
(``server`` fixture in conftest.py; skipped unless COMFYUI_PATH is set).

- /object_info lists every RewardLab node, and agrees with batch/stock_nodes.py on every stock node we use;
- each shipped editor workflow converts, with the server's /object_info, to the shipped API file;
- the routes answer (also under /api/...);
- the scoring and guidance workflows run end to end through ``rewardlab run`` (sweep, downloads, manifest,
  reward report) with the download-free tiny models.
"""
import copy
import glob
import json
import os

import pytest

from rewardlab.batch import cli
from rewardlab.batch.convert import to_api
from rewardlab.batch.widgets import input_specs, saved_widgets
from rewardlab.batch.runner import Manifest
from rewardlab.batch.stock_nodes import FILE_FOLDER, STOCK_NODES
from rewardlab.nodes import NODE_CLASS_MAPPINGS

from .conftest import CLIP_FILE, REPO, UNET_FILE, VAE_FILE

OPTION_KEYS = ("default", "min", "max", "step", "round", "control_after_generate", "forceInput", "image_upload",
               "multiline", "dynamicPrompts")


@pytest.fixture(scope="module")
def info(server):
    return server.get_json("/object_info")


def test_object_info_lists_every_pack_node(server, info):
    assert sorted(set(NODE_CLASS_MAPPINGS) - set(info)) == []
    failed = [line for line in server.log().splitlines() if "IMPORT FAILED" in line and "rewardlab" in line]
    assert failed == []  # (stock audio nodes may fail without torchaudio; that is not ours)


def test_stock_table_agrees_with_the_server(info):
    for name, ours in STOCK_NODES.items():
        real = info[name]
        assert real["output"] == ours["output"] and real["output_name"] == ours["output_name"], name
        assert real["display_name"] == ours["display_name"] and real["output_node"] == ours["output_node"], name
        assert [w.name for w in saved_widgets(real, name)] == [w.name for w in saved_widgets(ours, name)], name
        ours_specs = {n: (t, o) for n, t, o in input_specs(ours)}
        real_specs = {n: (t, o) for n, t, o in input_specs(real)}
        assert list(real_specs) == list(ours_specs), name
        for inp, (typ, opts) in ours_specs.items():
            rtyp, ropts = real_specs[inp]
            if FILE_FOLDER in opts:
                assert isinstance(rtyp, list) or rtyp == "COMBO", (name, inp)
            else:
                assert rtyp == typ, (name, inp)
            for key in OPTION_KEYS:
                assert ropts.get(key) == opts.get(key), (name, inp, key)


def shipped_pairs():
    """(editor file, API file) of every shipped workflow (editor files are named by title, see workflows/build.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("rewardlab_workflow_build", os.path.join(REPO, "workflows",
                                                                                          "build.py"))
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return [(os.path.join(REPO, build.editor_path(n)), os.path.join(REPO, build.api_path(n))) for n in build.WORKFLOWS]


def test_shipped_editor_workflows_convert_with_server_object_info(info):
    pairs = shipped_pairs()
    assert pairs and len(pairs) == len(glob.glob(os.path.join(REPO, "example_workflows", "*.json")))
    for editor_path, api_path in pairs:
        with open(editor_path) as f:
            editor = json.load(f)
        with open(api_path) as f:
            assert to_api(editor, info) == json.load(f), editor_path


def test_routes_are_registered(server):
    for prefix in ("", "/api"):
        rewards = server.get_json(prefix + "/rewardlab/rewards")["rewards"]
        assert {"brightness", "aesthetic-v2"} <= {r["name"] for r in rewards}
        assert "runs" in server.get_json(prefix + "/rewardlab/training")


def widgets_with_defaults(info, class_type, **given):
    inputs = {}
    for name, typ, opts in input_specs(info[class_type]):
        if name in given:
            inputs[name] = given[name]
        elif name in info[class_type]["input"].get("required", {}) and (isinstance(typ, list) or "default" in opts):
            inputs[name] = opts.get("default", typ[0] if isinstance(typ, list) else None)
    return {"class_type": class_type, "inputs": inputs}


def tiny(api, info):
    """A shipped API workflow on the tiny fixture models: the checkpoint loader becomes UNET/CLIP/VAE loaders and
    a weight-file reward becomes the weight-free brightness reward."""
    api = copy.deepcopy(api)
    ckpt = next(nid for nid, n in api.items() if n["class_type"] == "CheckpointLoaderSimple")
    del api[ckpt]
    loaders = ["unet", "clip", "vae"]
    api["unet"] = widgets_with_defaults(info, "UNETLoader", unet_name=UNET_FILE)
    api["clip"] = widgets_with_defaults(info, "CLIPLoader", clip_name=CLIP_FILE, type="stable_diffusion")
    api["vae"] = widgets_with_defaults(info, "VAELoader", vae_name=VAE_FILE)
    for nid, node in api.items():
        if node["class_type"] == "RewardLabLoadReward":
            api[nid] = widgets_with_defaults(info, "RewardLabWeightFreeReward", kind="brightness")
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] == ckpt:
                node["inputs"][name] = [loaders[value[1]], 0]
    return api


SMALL = ["EmptyLatentImage.width=64", "EmptyLatentImage.height=64"]
RUNS = {  # small settings and a two-value seed sweep per workflow
    "score_and_rank": SMALL + ["EmptyLatentImage.batch_size=2", "KSampler.steps=2", "KSampler.seed=[1, 2]"],
    "guidance_model_patch": SMALL + ["KSampler.steps=2", "KSampler.seed=[1, 2]"],
    "reno_noise": SMALL + ["RewardLabReNOOptimiseNoise.iterations=2", "RewardLabReNOOptimiseNoise.seed=[1, 2]"],
    "noise_search": SMALL + ["RewardLabNoiseSearch.steps=2", "BasicScheduler.steps=2", "RewardLabNoiseSearch.budget=2",
                             "RewardLabNoiseSearch.seed=[1, 2]"],
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_workflow_runs_end_to_end_through_rewardlab_run(name, server, info, tmp_path, capsys):
    with open(os.path.join(REPO, "workflows", "api", f"{name}.json")) as f:
        api = tiny(json.load(f), info)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(api))
    out = tmp_path / "out"
    args = [str(path), "--server", server.url, "--out", str(out), "--score", "brightness", "--no-progress",
            "--poll", "1", "--timeout", "300"]
    for assignment in RUNS[name]:
        args += ["--set", assignment]
    assert cli.main(args) == 0, capsys.readouterr().err
    records = Manifest(str(out)).load()
    assert len(records) == 2 and all(r["status"] == "success" for r in records.values())
    for rec in records.values():
        assert rec["outputs"] and all((out / o["path"]).stat().st_size > 0 for o in rec["outputs"])
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert scores and scores == sorted(scores, key=lambda s: -s["score"])
    assert (out / "report.html").exists()
    assert cli.main(args) == 0  # rerun: everything is skipped
    assert "resume: 2 of 2 runs already finished" in capsys.readouterr().err
