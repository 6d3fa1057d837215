"""One table of user-facing DRaFT settings (training/options.py) drives both the `rewardlab train` arguments and
the DRaFT Train LoRA node's inputs: same names, defaults, ranges and choices, and the same DraftConfig."""
import pytest

from rewardlab.cli import build_parser
from rewardlab.nodes.train_nodes import RewardLabDRaFTTrainLoRA
from rewardlab.training.draft import METHODS, DraftConfig
from rewardlab.training.options import OPTIONS, config_from_options


def node_specs():
    spec = RewardLabDRaFTTrainLoRA.INPUT_TYPES()
    return {**spec["required"], **spec["optional"]}


def test_every_node_option_is_a_node_input_with_the_config_default():
    inputs = node_specs()
    for o in OPTIONS:
        if o.ui == "cli":
            assert o.input_name not in inputs
            continue
        kind, opts = inputs[o.input_name]
        assert opts["tooltip"] == o.help and opts["default"] == o.default
        if o.choices is not None:
            assert kind == list(o.choices)
    assert inputs["method"][0] == [m.label for m in METHODS.values()]      # labels come from the method table


def test_cli_arguments_come_from_the_same_table():
    args = build_parser().parse_args(["train"])
    defaults = DraftConfig()
    for o in OPTIONS:
        value = getattr(args, o.input_name)
        if o.input_name in ("steps", "cfg"):
            assert value is None                      # chosen per model (tiny vs SD) when the run starts
        else:
            assert o.to_config(value) == getattr(defaults, o.field), o.field
    args = build_parser().parse_args(["train", "--method", "alignprop", "--lr", "1e-3", "--no-checkpointing",
                                      "--targets", "attention + feed-forward", "--early-stop", "3"])
    cfg = config_from_options({o.input_name: getattr(args, o.input_name) for o in OPTIONS} | {"steps": 8, "cfg": 3.0})
    assert (cfg.method, cfg.lr, cfg.checkpointing, cfg.early_stop_patience) == ("alignprop", 1e-3, False, 3)
    assert cfg.targets == "attention + feed-forward"


def test_node_labels_and_cli_values_give_the_same_config():
    node = {name: spec[1]["default"] for name, spec in node_specs().items()
            if name in {o.input_name for o in OPTIONS}}
    node.update(method="DRaFT-LV", targets="all")
    cli = dict(node, method="draft_lv")
    assert config_from_options(node) == config_from_options(cli)
    assert config_from_options(node).method == "draft_lv" and config_from_options(node).targets == "all"
    with pytest.raises(ValueError, match="unknown DRaFT settings"):
        config_from_options({"learning_rat": 1e-3})
    with pytest.raises(ValueError, match="method must be one of"):
        config_from_options({"method": "ddpo"})
    with pytest.raises(ValueError, match="exceeds the 4 sampling steps"):
        config_from_options({"k": 5, "steps": 4})
