"""One table of user-facing DRaFT settings (training/options.py) drives both the `rewardlab train` arguments and
the DRaFT Train LoRA node's inputs: same names, defaults, ranges and choices, and the same DraftConfig."""
import pytest

from rewardlab.cli import build_parser
from rewardlab.batch.widgets import widget_layout
from rewardlab.nodes.train_nodes import RewardLabDRaFTOptions, RewardLabDRaFTTrainLoRA, advanced_options
from rewardlab.training.draft import METHODS, DraftConfig
from rewardlab.training.options import OPTIONS, config_from_options


def node_specs():
    """The train node's inputs and its DRaFT Options node's, together."""
    spec = RewardLabDRaFTTrainLoRA.INPUT_TYPES()
    return {**spec["required"], **spec["optional"], **RewardLabDRaFTOptions.INPUT_TYPES()["required"]}


def test_the_table_says_which_node_shows_an_option():
    """'node' options sit on DRaFT Train LoRA, 'node-optional' ones on DRaFT Options, which plugs into the train
    node's options input: the train node stays compact."""
    train = RewardLabDRaFTTrainLoRA.INPUT_TYPES()
    options = RewardLabDRaFTOptions.INPUT_TYPES()["required"]
    for o in OPTIONS:
        on_train = o.input_name in train["required"] or o.input_name in train["optional"]
        assert on_train == (o.ui == "node"), o.input_name
        assert (o.input_name in options) == (o.ui == "node-optional"), o.input_name
    assert train["optional"]["options"][0] == RewardLabDRaFTOptions.RETURN_TYPES[0]
    widgets = widget_layout({"input": train}, "RewardLabDRaFTTrainLoRA")
    assert len(widgets) <= 20, [w.name for w in widgets]          # 32 before the options node


def test_options_node_values_reach_the_trainer():
    chosen = RewardLabDRaFTOptions().collect(**{**advanced_options(), "kl_weight": 0.5, "targets": "all",
                                                "heldout_prompts": "a cat"})[0]
    merged = advanced_options(chosen)
    assert merged["kl_weight"] == 0.5 and merged["heldout_prompts"] == "a cat" and merged["resume"] is False
    assert advanced_options()["kl_weight"] == DraftConfig().kl_weight
    with pytest.raises(ValueError, match="unknown DRaFT options"):
        advanced_options({"kl_wieght": 1.0})


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
