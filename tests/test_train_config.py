"""train.py's flags: YAML presets as defaults (default < YAML < CLI), strict keys and types."""
from __future__ import annotations

import argparse

import pytest
import yaml

from conftest import REPO
from emakit.training import UsageError
from emakit.training.config import args_to_yaml, build_parser, parse_args, parse_settings


def write_yaml(path, mapping) -> str:
    path.write_text(yaml.safe_dump(mapping))
    return str(path)


def test_yaml_overrides_defaults_and_the_command_line_overrides_yaml(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"epochs": 3, "model_ema_decay": 0.99, "model": "test_resnet"})
    args = parse_args(["--config", cfg, "--epochs", "5"])
    assert args.epochs == 5                    # CLI beats YAML
    assert args.model_ema_decay == 0.99        # YAML beats default
    assert args.model == "test_resnet"
    assert args.seed == build_parser().get_default("seed") == 42  # untouched default


def test_unknown_yaml_key_is_an_error_naming_the_key(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"model_ema_decy": 0.999})
    with pytest.raises(UsageError, match="unknown key 'model_ema_decy'"):
        parse_args(["--config", cfg])


def test_unknown_yaml_key_exits_2_with_one_line_before_anything_is_written(tmp_path, run_train):
    cfg = write_yaml(tmp_path / "c.yaml", {"epohcs": 1})
    code, out, err = run_train(["--config", cfg, "--output", tmp_path / "out"])
    assert code == 2
    assert err.strip().count("\n") == 0 and "unknown key 'epohcs'" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mapping, key", [
    ({"epochs": "ten"}, "epochs"),
    ({"epochs": 2.5}, "epochs"),
    ({"amp": "yes"}, "amp"),
    ({"scale": 0.5}, "scale"),
    ({"lr": "fast"}, "lr"),
    ({"model": 18}, "model"),
    ({"eval_metric": "top3"}, "eval_metric"),
    ({"seed": None}, "seed"),
])
def test_wrong_yaml_value_type_is_an_error_naming_the_key(tmp_path, mapping, key):
    cfg = write_yaml(tmp_path / "c.yaml", mapping)
    with pytest.raises(UsageError, match=f"config key '{key}'"):
        parse_args(["--config", cfg])


def test_yaml_exponent_without_a_dot_is_read_as_a_number(tmp_path):
    # PyYAML (YAML 1.1) loads `1e-3` as the string "1e-3"; users write it anyway.
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nweight_decay: 5.0e-5\n")
    args = parse_args(["--config", str(tmp_path / "c.yaml")])
    assert args.lr == 0.001 and args.weight_decay == 5e-5


def test_a_yaml_true_boolean_can_be_turned_off_on_the_command_line(tmp_path):
    cfg = write_yaml(tmp_path / "c.yaml", {"amp": True, "channels_last": True})
    assert parse_args(["--config", cfg]).amp is True
    args = parse_args(["--config", cfg, "--no-amp"])
    assert args.amp is False and args.channels_last is True


# What `python train.py` (no data path, no --config) changes from timm's defaults: the README's
# digits preset, written out here so that a change to configs/digits.yaml or to the preset
# logic shows up as a failure.
DIGITS_PRESET_VALUES = {"model": "resnet18", "img_size": 32, "crop_pct": 1.0, "batch_size": 64, "workers": 0,
                        "epochs": 10, "lr_base": 0.8, "warmup_epochs": 0, "weight_decay": 5e-5, "scale": [0.5, 1.0],
                        "hflip": 0.0, "model_ema": True, "model_ema_half_life": "0.5ep"}


def test_digits_preset_is_exactly_the_defaults(tmp_path):
    default = vars(parse_args([]))
    preset = vars(parse_args(["--config", str(REPO / "configs" / "digits.yaml")]))
    timm = vars(parse_args([str(tmp_path)]))  # a data path: timm's defaults, no preset
    for flags in (default, preset, timm):
        flags.pop("config"), flags.pop("data")
    assert preset == default
    assert {k: v for k, v in default.items() if timm[k] != v} == DIGITS_PRESET_VALUES


def test_imagenette_recipe_parses_and_sets_a_resnet34():
    args = parse_args(["--config", str(REPO / "configs" / "imagenette2-320_resnet34.yaml"), "/data/imagenette2-320"])
    assert (args.model, args.img_size, args.data) == ("resnet34", 224, "/data/imagenette2-320")
    assert args.model_ema and args.model_ema_half_life == "2ep"


def test_every_flag_help_states_its_default():
    parser = build_parser()
    missing = [a.option_strings or a.dest for a in parser._actions
               if not isinstance(a, argparse._HelpAction) and "(default:" not in (a.help or "")]
    assert missing == []


def test_timm_flag_names_are_accepted():
    args = parse_args(["--model-ema", "--model-ema-decay", "0.9998", "--model-ema-warmup", "--model-ema-force-cpu",
                       "--amp", "--amp-dtype", "bfloat16", "--channels-last", "--grad-accum-steps", "2",
                       "--resume", "x.pth.tar", "--output", "o", "--experiment", "e", "--eval-metric", "loss",
                       "--checkpoint-hist", "3", "-b", "16", "--lr", "0.1", "--epochs", "2", "--opt", "adamw",
                       "--sched", "step", "--warmup-epochs", "1", "--img-size", "64", "--num-classes", "5",
                       "--workers", "1", "--device", "cpu", "--seed", "1", "--dist-bn", "broadcast",
                       "--smoothing", "0.0", "--mixup", "0.2", "--cutmix", "1.0", "--clip-grad", "1.0",
                       "--torchcompile", "--log-interval", "5", "--weight-decay", "0.05"])
    assert args.model_ema_decay == 0.9998 and args.torchcompile == "inductor" and args.batch_size == 16


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(UsageError, match="unrecognized arguments: --model-ema-decy"):
        parse_args(["--model-ema-decy", "0.9"])


def test_resolved_args_yaml_loads_back_as_a_config(tmp_path):
    args = parse_args(["--epochs", "7", "--model", "test_resnet", "--scale", "0.3", "1.0"])
    path = tmp_path / "args.yaml"
    path.write_text(args_to_yaml(args))
    again = parse_args(["--config", str(path)])
    assert {k: v for k, v in vars(again).items() if k != "config"} == \
        {k: v for k, v in vars(args).items() if k != "config"}


def test_ema_time_constant_comes_from_exactly_one_source():
    assert _ema_source([]) == (None, ("0.5ep",), "constant")  # the preset's half-life
    assert _ema_source(["--model-ema-decay", "0.9998"]) == ((0.9998,), None, "constant")
    with pytest.raises(UsageError, match=r"argument --model-ema-half-life: invalid value '' \(empty\)"):
        parse_args(["--model-ema-half-life", ""])  # issue 8: refused, not a silent switch to the default decay
    assert _ema_source(["--model-ema-warmup"])[2] == "warmup"


def _ema_source(argv: list[str]) -> tuple:
    ema = parse_settings(argv).ema
    return ema.decays, ema.half_lives, ema.schedule


def test_model_ema_warmup_conflicting_with_another_schedule_is_an_error():
    with pytest.raises(UsageError, match="conflicts"):
        parse_args(["--model-ema-warmup", "--model-ema-schedule", "threshold"])


def test_pretrained_alone_asks_for_the_models_own_weights_as_in_timm(tmp_path):
    s = parse_settings([str(tmp_path), "--pretrained"]).model
    assert s.pretrained and s.weights_file is None


def test_with_a_data_path_the_defaults_are_timms(tmp_path):
    args = parse_args([str(tmp_path), "--model-ema"])
    assert (args.model, args.batch_size, args.img_size, args.epochs, args.hflip) == ("resnet50", 128, None, 300, 0.5)
    assert _ema_source([str(tmp_path), "--model-ema"]) == ((0.9998,), None, "constant")  # timm's default decay
    assert parse_args([str(tmp_path)]).model_ema is False        # EMA is opt-in, as in timm
    assert parse_args([]).model_ema is True                      # the digits preset turns it on


# --------------------------------------------------------------------------- issue 5 flags
def test_a_comma_list_of_decays_or_half_lives_gives_one_value_per_ema():
    assert parse_args(["--model-ema-decay", "0.999,0.9998,0.9999"]).model_ema_decay == [0.999, 0.9998, 0.9999]
    assert parse_args(["--model-ema-half-life", "2000ba, 0.5ep"]).model_ema_half_life == ["2000ba", "0.5ep"]
    assert parse_args(["--model-ema-decay", "0.9998"]).model_ema_decay == 0.9998  # one value: a scalar, as before
    assert _ema_source(["--model-ema-decay", "0.99,0.999"])[:2] == ((0.99, 0.999), None)


@pytest.mark.parametrize("value", [[0.999, 0.9999], "0.999,0.9999"])
def test_yaml_takes_a_list_or_a_comma_string_of_decays(tmp_path, value):
    cfg = write_yaml(tmp_path / "c.yaml", {"model_ema_decay": value, "posthoc_sigma_rels": [0.04, 0.1]})
    args = parse_args(["--config", cfg])
    assert args.model_ema_decay == [0.999, 0.9999] and args.posthoc_sigma_rels == [0.04, 0.1]


def test_new_flags_defaults():
    args = parse_args(["data"])
    assert (args.model_ema_select, args.model_ema_bn_recal, args.model_ema_posthoc) == ("first", 0, False)
    assert (args.posthoc_sigma_rels, args.posthoc_every, args.posthoc_dtype, args.posthoc_max_snapshots) == \
        ([0.05, 0.1], None, "float16", None)


def test_resolved_args_with_lists_load_back_as_a_config(tmp_path):
    args = parse_args(["--model-ema-decay", "0.99,0.999", "--model-ema-posthoc", "--posthoc-sigma-rels", "0.07"])
    path = tmp_path / "args.yaml"
    path.write_text(args_to_yaml(args))
    again = parse_args(["--config", str(path)])
    assert again.model_ema_decay == [0.99, 0.999] and again.posthoc_sigma_rels == [0.07]


@pytest.mark.parametrize("flags, needle", [
    (["--model-ema-decay", "0.999,abc"], "'abc' in '0.999,abc' is not a decay"),
    (["--model-ema-decay", "0.999,,0.9"], "empty item"),
    (["--model-ema-decay", "0.99,0.99"], "lists a decay twice"),
    (["--model-ema-half-life", "2ba,2ba"], "lists a half-life twice"),
    (["--model-ema-select", "worst"], "invalid choice: 'worst'"),
    (["--model-ema-bn-recal", "-1"], "argument --model-ema-bn-recal: invalid value '-1' (too small); give an integer >= 0"),
    (["--model-ema-bn-recal", "5", "--no-model-ema"], "add --model-ema"),
    (["--model-ema-posthoc", "--posthoc-sigma-rels", "0.5"], "outside (0, 0.2887]"),
    (["--model-ema-posthoc", "--posthoc-sigma-rels", "0.1,0.1000001"], "first 6 decimals"),
    (["--model-ema-posthoc", "--posthoc-every", "0"], "argument --posthoc-every: invalid value '0' (too small); give an integer >= 1"),
    (["--model-ema-posthoc", "--posthoc-max-snapshots", "1"], "argument --posthoc-max-snapshots: invalid value '1' (too small); give an integer >= 2"),
    (["--model-ema-posthoc", "--posthoc-dtype", "int8"], "invalid choice: 'int8'"),
    (["--posthoc-every", "10"], "needs --model-ema-posthoc"),
])
def test_bad_multi_ema_posthoc_and_bn_recal_values_exit_2_with_one_line(run_train, tmp_path, flags, needle):
    code, _, err = run_train([*flags, "--output", tmp_path / "out"])
    assert code == 2, err
    assert err.strip().count("\n") == 0 and err.startswith("train.py: error:") and needle in err, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("mapping, needle", [
    ({"model_ema_decay": [0.99, "x"]}, "config key 'model_ema_decay': 'x' in '0.99,x' is not a decay"),
    ({"model_ema_decay": []}, "config key 'model_ema_decay': expected at least one decay"),
    ({"model_ema_decay": True}, "config key 'model_ema_decay'"),
    ({"posthoc_sigma_rels": None}, "config key 'posthoc_sigma_rels': null is not allowed"),
])
def test_bad_list_values_in_yaml_name_the_key(tmp_path, mapping, needle):
    cfg = write_yaml(tmp_path / "c.yaml", mapping)
    with pytest.raises(UsageError) as info:
        parse_args(["--config", cfg])
    assert needle in str(info.value)


# --------------------------------------------------------------------------- one declaration (issue 20)
def test_each_settings_field_is_one_flag_with_the_same_default_in_the_parser_and_the_settings(tmp_path):
    """The parser, the YAML keys and the frozen settings come from the same declarations: the
    settings built from timm's defaults (a data path, no preset) equal the dataclasses' own
    defaults, and every declared field has exactly one parser action with its dest."""
    import dataclasses

    from emakit.training.options import flag_fields
    from emakit.training.settings import TrainSettings

    built = parse_settings([str(tmp_path)])
    assert dataclasses.replace(built, flags={}, data=dataclasses.replace(built.data, path=None)) == \
        dataclasses.replace(TrainSettings(), flags={})
    dests = [a.dest for a in build_parser()._actions]
    declared = []

    def walk(cls):
        for f, flag in flag_fields(cls):
            if flag is not None:
                declared.append(flag.key)
                if flag.section is not None:
                    walk(flag.section)
            elif dataclasses.is_dataclass(f.default_factory):
                walk(f.default_factory)
    walk(TrainSettings)
    assert sorted(declared) == sorted(d for d in dests if d not in ("help", "config"))


def test_a_flag_reaches_its_settings_field_from_the_command_line_and_from_yaml(tmp_path):
    cli = parse_settings([str(tmp_path), "--clip-grad", "2.5", "--log-interval", "7", "--on-nonfinite", "skip",
                          "--no-opt-fused", "--no-prefetcher", "--scale", "0.3", "1"])
    assert (cli.optim.clip_grad, cli.run.log_interval, cli.run.on_nonfinite) == (2.5, 7, "skip")
    assert (cli.optim.fused, cli.data.prefetcher, cli.data.augment.scale) == (False, False, (0.3, 1.0))
    config = tmp_path / "c.yaml"
    config.write_text("clip_grad: 2.5\nlog_interval: 7\non_nonfinite: skip\nno_opt_fused: true\nscale: [0.3, 1]\n")
    yaml_run = parse_settings([str(tmp_path), "--config", str(config)])
    assert (yaml_run.optim, yaml_run.run.log_interval, yaml_run.data.augment.scale) == (cli.optim, 7, (0.3, 1.0))
    assert parse_settings([str(tmp_path), "--model-ema-posthoc"]).ema.posthoc.sigma_rels == (0.05, 0.1)
    assert parse_settings([str(tmp_path)]).ema.posthoc is None


def test_help_shows_the_declared_default_once():
    text = build_parser().format_help().replace("\n", " ")
    text = " ".join(text.split())
    assert "--clip-grad NORM clip gradients at this norm/value > 0 (default: None = no clipping)" in text
    assert "--posthoc-sigma-rels S[,S...]" in text and "(default: 0.05,0.1)" in text
    assert "--no-opt-fused" in text and "(default: False = fused where torch has it)" in text


# --------------------------------------------------------------------------- hostile YAML (issue 19)
@pytest.mark.parametrize("content, needle", [
    (b"model: \xff\xfe\n", "not UTF-8 text (byte 7); save it as UTF-8"),
    (b"model_ema_half_life: 0.5\n", "0.5 in '0.5' is not a half-life with a unit"),
    (b"".join(b"%s: &%s [%s]\n" % (bytes([97 + i]), bytes([97 + i]), b",".join([b"*" + bytes([96 + i])] * 9)
                                   if i else b"x,x,x,x,x,x,x,x,x") for i in range(9)), "more than 10000 values"),
    (b"".join(b"k%d: &a%d [1]\n" % (i, i) for i in range(60)) + b"z: [" + b",".join(b"*a%d" % (i % 60) for i in range(101))
     + b"]\n", "more than 100 YAML aliases"),
])
def test_a_hostile_config_is_one_short_line_and_nothing_expands(tmp_path, content, needle):
    """A non-UTF-8 file, a half-life without its unit (EMA off), nested anchors ("billion
    laughs", 300 bytes that expand to 9**9 values) and alias floods: one short UsageError,
    before anything is built."""
    config = tmp_path / "c.yaml"
    config.write_bytes(content)
    with pytest.raises(UsageError) as info:
        parse_args(["--config", str(config)])
    message = str(info.value)
    assert needle in message and "\n" not in message and len(message) < 400, message[:500]


def test_a_huge_value_in_a_config_is_echoed_shortened():
    parser = build_parser()
    with pytest.raises(UsageError) as info:
        from emakit.training.config import _check_value

        _check_value("model", next(a for a in parser._actions if a.dest == "model"), [[1] * 50] * 50)
    assert "expected a string" in str(info.value) and len(str(info.value)) < 200

