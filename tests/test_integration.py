"""Transformers integration (issue #3): registration, argument parsing, option errors, unsupported setups.

Trainer runs are in test_integration_trainer.py, the launcher in test_integration_launcher.py.
"""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import HfArgumentParser, Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

import hf_q4shampoo
from hf_q4shampoo import (
    ConfigError,
    Q4Shampoo,
    Q4ShampooTrainer,
    Q4ShampooTrainingArguments,
    UnsupportedSetupError,
    make_optimizer_cls_and_kwargs,
)
from hf_q4shampoo.integrations import registration

from tiny_hf import lm_dataset, one_torch_thread, tiny_gpt2, training_args  # noqa: F401 (autouse fixture)

CLI = [
    "--output_dir",
    "unused",
    "--optim",
    "q4shampoo",
    "--learning_rate",
    "0.02",
    "--adam_beta1",
    "0.8",
    "--adam_beta2",
    "0.95",
    "--adam_epsilon",
    "1e-7",
    "--weight_decay",
    "0.1",
    "--optim_args",
    "precond=eigen, update_freq=10,root_freq=50,max_precond_dim=256,nesterov=true,ef_beta=0.5",
]
EXPECTED_OPTIONS = dict(precond="eigen", update_freq=10, root_freq=50, max_precond_dim=256, nesterov=True, ef_beta=0.5)


def _check_parsed(args):
    assert args.optim == "q4shampoo"
    cls, kwargs = make_optimizer_cls_and_kwargs(args)
    assert cls is Q4Shampoo
    assert kwargs == dict(lr=0.02, betas=(0.8, 0.95), eps=1e-7, weight_decay=0.1, **EXPECTED_OPTIONS)
    # values arrive typed, not as strings
    assert type(kwargs["update_freq"]) is int and type(kwargs["nesterov"]) is bool and type(kwargs["ef_beta"]) is float


# ---- registration ----------------------------------------------------------------------------


def test_import_registers_name_and_handler():
    member = OptimizerNames("q4shampoo")
    assert member is OptimizerNames.Q4SHAMPOO is OptimizerNames["Q4SHAMPOO"]
    assert "q4shampoo" in [m.value for m in OptimizerNames]  # iteration: what argparse's choices use
    if registration._mode == "handler_registry":
        from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS

        assert _OPTIMIZER_HANDLERS["q4shampoo"] is registration._handler
        assert _OPTIMIZER_HANDLERS["q4adamw"] is registration._q4adamw_handler
    assert OptimizerNames("q4adamw") is OptimizerNames.Q4ADAMW
    assert registration.is_registered()


def test_register_is_idempotent():
    names = list(OptimizerNames.__members__)
    handler_before = Trainer.get_optimizer_cls_and_kwargs
    first, second = hf_q4shampoo.register(), hf_q4shampoo.register()
    assert first == second
    assert list(OptimizerNames.__members__) == names
    assert Trainer.get_optimizer_cls_and_kwargs is handler_before


def test_enum_member_round_trips():
    import copy
    import pickle

    member = OptimizerNames.Q4SHAMPOO
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    assert member == "q4shampoo" and {"q4shampoo": 1}[member] == 1


def test_registration_is_additive_and_wrapper_mode_dispatches(tmp_path):
    # A fresh interpreter without auto-registration: compare transformers before and after, and run the
    # transformers 5.0/5.1 dispatch (a wrapper of Trainer.get_optimizer_cls_and_kwargs) on this version.
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(sys.path[0])!r})
        sys.path.insert(0, {str(__import__("os").path.dirname(__file__))!r})
        import hf_q4shampoo
        from hf_q4shampoo.integrations import registration
        from transformers import HfArgumentParser, Trainer, TrainingArguments
        from transformers.training_args import OptimizerNames
        try:  # transformers >= 5.2; 5.0 / 5.1 have no handler registry
            from transformers.trainer_optimizer import _OPTIMIZER_HANDLERS as handlers
        except ImportError:
            handlers = {{}}
        out = {{}}
        out["members_before"] = list(OptimizerNames.__members__)
        handlers_before = dict(handlers)
        try:
            HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
                ["--output_dir", "x", "--optim", "q4shampoo"]
            )
        except SystemExit as e:
            out["stock_parser_exit"] = e.code
        try:
            TrainingArguments("x", optim="q4shampoo")
        except ValueError as e:
            out["stock_args_error"] = str(e)[:80]
        out["mode"] = registration._register("trainer_wrapper")
        out["members_after"] = list(OptimizerNames.__members__)
        out["handlers_unchanged"] = dict(handlers) == handlers_before
        (a,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", {str(tmp_path)!r}, "--optim", "q4shampoo", "--optim_args", "update_freq=3",
             "--use_cpu", "true"])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(a)
        out["wrapper_cls"], out["wrapper_update_freq"] = cls.__name__, kwargs["update_freq"]
        (b,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", {str(tmp_path)!r}, "--optim", "sparse_mfac", "--optim_args", "m=7", "--use_cpu", "true"])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(b)
        out["sparse_cls"], out["sparse_m"] = cls.__name__, kwargs["m"]
        (c,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", {str(tmp_path)!r}, "--optim", "q4adamw", "--optim_args", "variant=factor",
             "--use_cpu", "true"])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(c)
        out["q4adamw_cls"], out["q4adamw_variant"] = cls.__name__, kwargs["variant"]
        a.optim = OptimizerNames.SGD
        out["sgd_cls"] = Trainer.get_optimizer_cls_and_kwargs(a)[0].__name__
        registration._register("trainer_wrapper")
        out["wrapped_once"] = not getattr(Trainer.get_optimizer_cls_and_kwargs.__wrapped__, "_q4shampoo_handler", False)
        print("RESULT" + json.dumps(out))
    """)
    env = {**__import__("os").environ, "HF_Q4SHAMPOO_AUTO_REGISTER": "0", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert "Q4SHAMPOO" not in out["members_before"]
    assert out["stock_parser_exit"] == 2  # argparse: invalid choice (guards against upstream changes)
    assert "is not a valid OptimizerNames" in out["stock_args_error"]
    assert out["mode"] == "trainer_wrapper"
    assert out["members_after"] == out["members_before"] + ["Q4SHAMPOO", "SPARSE_MFAC", "Q4ADAMW"]
    assert out["handlers_unchanged"]
    assert out["wrapper_cls"] == "Q4Shampoo" and out["wrapper_update_freq"] == 3
    assert out["sparse_cls"] == "SparseMFAC" and out["sparse_m"] == 7
    assert out["q4adamw_cls"] == "Q4AdamW" and out["q4adamw_variant"] == "factor"
    assert out["sgd_cls"] == "SGD"
    assert out["wrapped_once"]


# ---- parsing: command line, JSON, dict -------------------------------------------------------


def test_cli_parse_through_hf_argument_parser():
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(CLI)
    assert args.optim is OptimizerNames.Q4SHAMPOO
    _check_parsed(args)


def test_json_config_file(tmp_path):
    config = {
        "output_dir": str(tmp_path),
        "optim": "q4shampoo",
        "learning_rate": 0.02,
        "adam_beta1": 0.8,
        "adam_beta2": 0.95,
        "adam_epsilon": 1e-7,
        "weight_decay": 0.1,
        "optim_args": CLI[-1],
    }
    path = tmp_path / "train.json"
    path.write_text(json.dumps(config))
    (args,) = HfArgumentParser(TrainingArguments).parse_json_file(str(path))
    _check_parsed(args)
    (args,) = HfArgumentParser(Q4ShampooTrainingArguments).parse_json_file(str(path))
    _check_parsed(args)


def test_training_arguments_subclass_keeps_plain_string_and_builtins():
    (args,) = HfArgumentParser(Q4ShampooTrainingArguments).parse_args_into_dataclasses(CLI)
    assert type(args.optim) is str and args.optim == "q4shampoo"
    _check_parsed(args)
    assert args.to_dict()["optim"] == "q4shampoo"
    default = Q4ShampooTrainingArguments("x")
    assert default.optim == TrainingArguments("x").optim  # the base default (adamw_torch_fused on torch >= 2.8)
    assert Q4ShampooTrainingArguments("x", optim="sgd").optim is OptimizerNames.SGD
    args = Q4ShampooTrainingArguments("x").set_optimizer("q4shampoo", learning_rate=0.5, args="update_freq=4")
    assert args.optim == "q4shampoo" and args.learning_rate == 0.5
    assert make_optimizer_cls_and_kwargs(args)[1]["update_freq"] == 4


# ---- errors ----------------------------------------------------------------------------------


BAD_OPTIM_ARGS = [
    ("update_freq=10,blocksize=64", ["'blocksize'", "Allowed keys:", "update_freq", "max_precond_dim"]),
    ("precond=cholesky-ef", ["precond='cholesky-ef'", "'cholesky_ef'", "'eigen'"]),
    ("update_freq=ten", ["update_freq='ten'", "integer"]),
    ("root_freq=0", ["root_freq", ">= 1"]),
    ("lr=0.1", ["'lr'", "--learning_rate"]),
    ("weight_decay=0.1", ["'weight_decay'", "--weight_decay"]),
    # failed inside transformers' own parser ("not enough values to unpack"), at train()
    ("update_freq", ["'update_freq' is not of the form key=value", "Allowed keys:", "root_freq"]),
    ("update_freq=10,update_freq=20", ["'update_freq' is given twice"]),
    ("max_aspect_ratio=0.5", ["max_aspect_ratio", "0 (no limit) or a number >= 1"]),
    ("first_order=sgd,nesterov=true,momentum=0", ["nesterov=True needs momentum > 0"]),
]


def _one_line_naming(error, fragments):
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


@pytest.mark.parametrize("optim_args,fragments", BAD_OPTIM_ARGS)
def test_bad_optim_args_stop_argument_parsing(optim_args, fragments):
    # when the TrainingArguments are built (stock class once registered, our subclass always, the CLI
    # parser), not at train() after the model and the data are loaded
    for cls in (TrainingArguments, Q4ShampooTrainingArguments):
        with pytest.raises(ConfigError) as info:
            cls("x", optim="q4shampoo", optim_args=optim_args)
        _one_line_naming(info.value, fragments)
    with pytest.raises(ConfigError) as info:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", "x", "--optim", "q4shampoo", "--optim_args", optim_args]
        )
    _one_line_naming(info.value, fragments)
    args = TrainingArguments("x", optim="adamw_torch")  # set afterwards: the optimizer's own check still holds
    object.__setattr__(args, "optim", OptimizerNames("q4shampoo"))
    object.__setattr__(args, "optim_args", optim_args)
    with pytest.raises(ConfigError) as info:
        make_optimizer_cls_and_kwargs(args)
    _one_line_naming(info.value, fragments)


def test_optim_args_of_other_optimizers_are_left_to_transformers():
    TrainingArguments("x", optim="adamw_torch", optim_args="anything,goes")
    with pytest.raises(ConfigError, match="SparseMFAC: optim_args item 'm' is not of the form key=value.*Allowed keys"):
        TrainingArguments("x", optim="sparse_mfac", optim_args="m")
    with pytest.raises(ConfigError, match="'bogus'"):
        Q4ShampooTrainingArguments("x").set_optimizer("q4shampoo", args="bogus=1")


def test_bad_optim_args_stop_the_stock_trainer_before_training(tmp_path):
    # optim_args changed after the arguments were built: the optimizer's handler still refuses them
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    args = training_args(tmp_path)
    object.__setattr__(args, "optim_args", "update_freq=1,blocksize=64")
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(16))
    with pytest.raises(ConfigError, match="unknown optim_args key 'blocksize'"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_q4shampoo_trainer_checks_optim_args_at_construction(tmp_path):
    args = training_args(tmp_path, cls=Q4ShampooTrainingArguments)
    object.__setattr__(args, "optim_args", "precond=cholesky-ef")
    with pytest.raises(ConfigError, match="precond"):
        Q4ShampooTrainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset(16))


def test_unknown_optim_names_keep_transformers_messages(capsys):
    with pytest.raises(SystemExit) as info:
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(["--output_dir", "x", "--optim", "q4shampo"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'q4shampo'" in err and "'q4shampoo'" in err
    for cls in (TrainingArguments, Q4ShampooTrainingArguments):
        with pytest.raises(ValueError, match="q4shampo is not a valid OptimizerNames"):
            cls("x", optim="q4shampo")


# ---- unsupported distributed setups ----------------------------------------------------------


def _args_with(**attributes):
    args = TrainingArguments("x", optim="q4shampoo")
    for name, value in attributes.items():
        object.__setattr__(args, name, value)  # as TrainingArguments would set them on a multi-GPU host
    return args


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_is_refused(stage, tmp_path):
    config = {"zero_optimization": {"stage": stage}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    for source in (config, str(path)):
        with pytest.raises(UnsupportedSetupError) as info:
            make_optimizer_cls_and_kwargs(_args_with(deepspeed=source))
        message = str(info.value)
        assert f"ZeRO stage {stage}" in message and "Supported setups" in message and "FSDP2" in message


def test_deepspeed_stage0_and_fsdp2_are_accepted():
    make_optimizer_cls_and_kwargs(_args_with(deepspeed={"zero_optimization": {"stage": 0}}))
    make_optimizer_cls_and_kwargs(_args_with(fsdp=True, fsdp_plugin_args={"fsdp_version": 2}))


def test_fsdp1_is_refused(monkeypatch):
    with pytest.raises(UnsupportedSetupError, match="FSDP1.*Supported setups"):
        make_optimizer_cls_and_kwargs(_args_with(fsdp=True, fsdp_plugin_args={"fsdp_version": 1}))
    # accelerate launch with an FSDP config (FSDP_VERSION defaults to 1 there)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UnsupportedSetupError, match="FSDP1"):
        make_optimizer_cls_and_kwargs(_args_with())
    monkeypatch.setenv("FSDP_VERSION", "2")
    make_optimizer_cls_and_kwargs(_args_with())


def test_unsupported_setup_stops_the_stock_trainer_before_training(tmp_path):
    model = tiny_gpt2()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=lm_dataset(16))
    object.__setattr__(trainer.args, "deepspeed", {"zero_optimization": {"stage": 2}})
    with pytest.raises(UnsupportedSetupError, match="ZeRO stage 2"):
        trainer.train()  # the error must come when the optimizer is chosen, before the first step
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
