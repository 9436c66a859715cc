import dataclasses

import pytest
import torch

from hf_q4shampoo import ConfigError, Q4ShampooConfig, parse_optim_args


def test_defaults_are_the_documented_ones():
    c = Q4ShampooConfig()
    assert c.precond == "cholesky_ef" and c.stat_decay == 0.95 and c.matrix_eps == 1e-6
    assert c.quant_map == "linear2" and c.quant_block_size == 64 and c.min_quant_numel == 4096
    assert (c.bjorck_update_iters, c.bjorck_root_iters) == (1, 4)
    assert c.first_order == "adamw" and c.first_order_bits == 4
    assert c.grafting == "norm"


def test_parse_optim_args_types_and_spaces():
    out = parse_optim_args(
        "precond = eigen, update_freq=10,root_freq=50, ef_beta=0.5,nesterov=True,"
        "max_aspect_ratio=0,first_order_bits=32,quant_map=DYNAMIC"
    )
    assert out == {
        "precond": "eigen",
        "update_freq": 10,
        "root_freq": 50,
        "ef_beta": 0.5,
        "nesterov": True,
        "max_aspect_ratio": 0.0,
        "first_order_bits": 32,
        "quant_map": "dynamic",
    }
    assert isinstance(out["max_aspect_ratio"], float)
    assert parse_optim_args(None) == {} and parse_optim_args("  ") == {}
    Q4ShampooConfig(**out)  # parsed values build a valid config


@pytest.mark.parametrize(
    "text,message",
    [
        ("precondd=eigen", "unknown optim_args key 'precondd'. Allowed keys: .*update_freq"),
        ("update_freq=ten", "update_freq='ten' is not an integer"),
        ("update_freq=0", 'update_freq must be "auto" or an integer >= 1, got 0'),
        (
            "precond=int8",
            "precond='int8' is not valid; allowed values: 'cholesky_ef', 'cholesky', 'eigen', 'naive', 'fp32'",
        ),
        ("nesterov=maybe", "nesterov='maybe' is not true or false"),
        ("ef_beta=1.5", r"ef_beta must be a number in \[0, 1\)"),
        ("root_bits=6", "root_bits=6 is not valid; allowed values: 4, 8, 32"),
        ("first_order_m_block=64", "first_order_m_block=64 is not valid; allowed values: 128, 256, 512, 1024"),
        ("update_freq", "not of the form key=value"),
    ],
)
def test_parse_optim_args_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_optim_args(text)


def test_reserved_keys_point_to_their_flag():
    with pytest.raises(ConfigError, match="'lr' cannot be set in optim_args; use --learning_rate"):
        parse_optim_args("lr=0.1", reserved={"lr": "--learning_rate"})


def test_config_is_frozen_and_serialisable():
    c = Q4ShampooConfig(update_freq=7)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.update_freq = 3
    d = c.to_dict()
    assert d["update_freq"] == 7 and all(isinstance(v, (int, float, str, bool, tuple, type(None))) for v in d.values())
    assert Q4ShampooConfig(**d) == c


def test_auto_schedule_follows_the_run_length():
    from hf_q4shampoo.config import UNKNOWN_LENGTH_SCHEDULE, auto_schedule

    assert Q4ShampooConfig().schedule() == UNKNOWN_LENGTH_SCHEDULE == (10, 100)
    assert Q4ShampooConfig(total_steps=800).schedule() == (8, 80) == auto_schedule(800)
    assert auto_schedule(50) == (1, 10) and auto_schedule(10**6) == (50, 500)
    # an explicit root_freq with an automatic update_freq keeps the 10:1 ratio; explicit values win
    assert Q4ShampooConfig(root_freq=50).schedule() == (5, 50)
    assert Q4ShampooConfig(update_freq=1, total_steps=800).schedule() == (1, 80)
    assert parse_optim_args("update_freq=AUTO,total_steps=300") == {"update_freq": "auto", "total_steps": 300}
    with pytest.raises(ConfigError, match="total_steps must be None"):
        Q4ShampooConfig(total_steps=0)


def test_first_root_step_and_cuda_graph_take_auto():
    from hf_q4shampoo.config import auto_first_root

    c = Q4ShampooConfig(total_steps=800)
    assert c.first_root_step == "auto" and c.cuda_graph == "auto"
    assert c.first_root() == 16 == auto_first_root(8, 80)  # two statistics periods, a fifth of the root period
    assert auto_first_root(1, 100) == 20 and auto_first_root(10, 100) == 20
    assert auto_first_root(100, 100) == 0  # not before the grid's first root: none
    assert Q4ShampooConfig(first_root_step=0).first_root() == 0
    assert Q4ShampooConfig(first_root_step=30).first_root() == 30
    parsed = parse_optim_args("first_root_step=AUTO,cuda_graph=auto")
    assert parsed == {"first_root_step": "auto", "cuda_graph": "auto"}
    assert parse_optim_args("first_root_step=24,cuda_graph=false") == {"first_root_step": 24, "cuda_graph": False}
    with pytest.raises(ConfigError, match='cuda_graph must be true, false or "auto"'):
        Q4ShampooConfig(cuda_graph="yes")


# ---- SparseMFAC (issue 17) ---------------------------------------------------------------------


def test_sparse_mfac_config_validation_and_k():
    from hf_q4shampoo import SparseMFAC, SparseMFACConfig

    c = SparseMFACConfig()
    assert (c.m, c.k_fraction, c.k, c.variant, c.rank, c.momentum) == (10, 0.01, None, "topk", 4, 0.0)
    with pytest.raises(ConfigError, match=r"k_fraction must be a number in \(0, 1\]"):
        SparseMFACConfig(k_fraction=0.0)
    with pytest.raises(ConfigError, match="variant='svd' is not valid; allowed values: 'topk', 'lowrank'"):
        SparseMFACConfig(variant="svd")
    with pytest.raises(ConfigError, match=r"unknown option\(s\) 'ngrads'. Allowed options: lr, m, k_fraction, k,"):
        SparseMFAC([torch.nn.Parameter(torch.zeros(2))], ngrads=10)
    with pytest.raises(ConfigError, match=r"give k \(entries per group\) or k_fraction \(density\), not both"):
        SparseMFACConfig.from_kwargs(k=5, k_fraction=0.1)
    with pytest.raises(ConfigError, match="damp must be a number in"):  # per-group values are validated too
        SparseMFAC([{"params": [torch.nn.Parameter(torch.zeros(2))], "damp": 0.0}])
    with pytest.raises(ConfigError, match="window_format applies to variant='topk' only"):
        SparseMFACConfig(variant="lowrank", window_format="sparse")
    c = SparseMFACConfig(k=50)
    assert c.k_for(1000) == 50 and c.k_for(20) == 20
    assert c.replace(k_fraction=0.1).k_for(1000) == 100  # a density replaces an absolute k
    assert SparseMFACConfig().k_for(1000) == 10 and SparseMFACConfig().k_for(50) == 1
    assert SparseMFACConfig(**c.to_dict()) == c


def test_sparse_mfac_optim_args():
    from hf_q4shampoo import parse_sparse_mfac_optim_args as parse

    out = parse("m=32, k_fraction=0.02,damp=1e-6,variant=LOWRANK,rank=2,momentum=0.9,lr_scaled_decay=false")
    assert out == {
        "m": 32,
        "k_fraction": 0.02,
        "damp": 1e-6,
        "variant": "lowrank",
        "rank": 2,
        "momentum": 0.9,
        "lr_scaled_decay": False,
    }
    assert parse("k=1000") == {"k": 1000} and parse(None) == {} and parse(" ") == {}


@pytest.mark.parametrize(
    "text,message",
    [
        ("ngrads=1024", "unknown optim_args key 'ngrads'. Allowed keys: m, k_fraction, k, damp, momentum,"),
        ("m=ten", "m='ten' is not an integer"),
        ("m=0", "m must be an integer >= 1, got 0"),
        ("damp=-1", r"damp must be a number in \(0, inf\)"),
        ("variant=svd", "variant='svd' is not valid; allowed values: 'topk', 'lowrank'"),
        ("lr_scaled_decay=maybe", "lr_scaled_decay='maybe' is not true or false"),
        ("k=10,k_fraction=0.1", "not both"),
        ("m", "not of the form key=value"),
        ("lr=0.1", "'lr' cannot be set in optim_args; use --learning_rate"),
    ],
)
def test_sparse_mfac_optim_args_errors(text, message):
    from hf_q4shampoo import parse_sparse_mfac_optim_args
    from hf_q4shampoo.integrations.optimizer_args import SPARSE_MFAC_RESERVED_OPTIM_ARGS

    with pytest.raises(ConfigError, match=message):
        parse_sparse_mfac_optim_args(text, reserved=SPARSE_MFAC_RESERVED_OPTIM_ARGS)


@pytest.mark.parametrize(
    "options,message",
    [
        ({"max_aspect_ratio": 0.5}, r"max_aspect_ratio must be 0 \(no limit\) or a number >= 1, got 0.5"),
        ({"quant_block_size": 10**9}, r"quant_block_size must be an integer in \[2, 4096\], got 1000000000"),
        ({"first_order": "sgd", "nesterov": True, "momentum": 0.0}, "nesterov=True needs momentum > 0"),
        ({"first_order_min_quant_numel": -1}, "first_order_min_quant_numel must be an integer >= 0"),
        ({"grafting": "sgd"}, "grafting='sgd' is not valid; allowed values: 'norm', 'adam'"),
        ({"grafting": "Adam"}, "grafting='Adam' is not valid; allowed values: 'norm', 'adam'"),
        ({"grafting": "adam", "first_order": "sgd"}, "grafting='adam' needs first_order='adamw'.*grafting='norm'"),
    ],
)
def test_values_accepted_before_but_wrong_are_refused(options, message):
    with pytest.raises(ConfigError, match=message):
        Q4ShampooConfig(**options)


def test_limits_themselves_are_accepted():
    Q4ShampooConfig(max_aspect_ratio=0)  # the rule switched off
    Q4ShampooConfig(max_aspect_ratio=1)
    Q4ShampooConfig(quant_block_size=4096)
    Q4ShampooConfig(first_order="sgd", nesterov=True, momentum=0.5)
    Q4ShampooConfig(nesterov=True, momentum=0.0)  # AdamW ignores the SGD options
    assert Q4ShampooConfig().first_order_min_quant_numel == 4096  # paper 3's threshold stays the default


def test_fused_statistics_is_accepted_with_every_factor_layout():
    # the Triton statistics update covers row/column scaling x feedback/refine (it was paper 1's layout only)
    assert Q4ShampooConfig().fused_statistics is True  # on by default since its H200 measurement (perf_notes v12)
    for scaling in ("row", "column"):
        for upper in ("feedback", "refine"):
            for precond in ("cholesky_ef", "cholesky"):
                Q4ShampooConfig(fused_statistics=True, factor_scaling=scaling, factor_upper=upper, precond=precond)


def test_numpy_scalars_become_python_numbers():
    np = pytest.importorskip("numpy")
    c = Q4ShampooConfig(
        lr=np.float32(0.5), update_freq=np.int64(10), betas=(np.float64(0.8), np.float32(0.5)), nesterov=np.bool_(True)
    )
    assert (c.lr, c.update_freq, c.betas, c.nesterov) == (0.5, 10, (0.8, 0.5), True)
    assert [type(v) for v in (c.lr, c.update_freq, *c.betas, c.nesterov)] == [float, int, float, float, bool]
    with pytest.raises(ConfigError, match="update_freq"):
        Q4ShampooConfig(update_freq=np.float64(2.5))


def test_state_keys_come_from_field_metadata():
    from dataclasses import fields

    from hf_q4shampoo.config import STATE_LAYOUT_KEYS

    flagged = {f.name for f in fields(Q4ShampooConfig) if f.metadata.get("state")}
    assert set(STATE_LAYOUT_KEYS) == flagged
    assert {"quant_map", "quant_block_size", "root_bits", "precond", "first_order_bits", "grafting"} <= flagged
    assert not {"update_freq", "root_freq", "lr", "stat_decay", "root_method"} & flagged


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("update_freq=10,update_freq=20", ["'update_freq' is given twice", "update_freq=10", "update_freq=20"]),
        ("update_freq", ["'update_freq' is not of the form key=value", "Allowed keys:", "root_freq"]),
        ("=10", ["'=10' is not of the form key=value", "Allowed keys:"]),
        ("update_freq=ten", ["update_freq='ten'", '"auto" or an integer >= 1']),
        ("max_aspect_ratio=0.5", ["max_aspect_ratio must be 0 (no limit) or a number >= 1", "max_aspect_ratio=0.5"]),
        ("quant_block_size=1000000000", ["quant_block_size must be an integer in [2, 4096]"]),
        ("first_order=sgd,nesterov=true,momentum=0", ["nesterov=True needs momentum > 0"]),
        ("precond=", ["precond=''", "'cholesky_ef'"]),
        ("grafting=rmsprop", ["grafting='rmsprop' is not valid", "'norm', 'adam'", "optim_args grafting=rmsprop"]),
        ("grafting=adam,first_order=sgd", ["grafting='adam' needs first_order='adamw'", "first_order='sgd'"]),
        ("cuda_graph=maybe", ["cuda_graph", "maybe"]),
        ("first_root_step=-1", ["first_root_step must be", '"auto" or an integer >= 0', "-1"]),
    ],
)
def test_every_malformed_optim_args_value_names_key_and_allowed_values(text, fragments):
    with pytest.raises(ConfigError) as info:
        parse_optim_args(text)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


def test_grafting_is_documented_and_parsed():
    doc = Q4ShampooConfig.__doc__
    assert "grafting: " in doc and '``"norm"`` (default)' in doc and '``"adam"``' in doc
    assert "first_order_m_block, grafting," in doc  # listed among the state fields
    assert parse_optim_args("grafting=ADAM") == {"grafting": "adam"}
    assert '``"adam_filtered"``' in doc
    assert parse_optim_args("grafting=adam_filtered") == {"grafting": "adam_filtered"}
    with pytest.raises(ConfigError, match="grafting='adam_filtered' needs first_order='adamw'"):
        Q4ShampooConfig(grafting="adam_filtered", first_order="sgd")
    from hf_q4shampoo.config import LEGACY_STATE_LAYOUT

    assert LEGACY_STATE_LAYOUT["grafting"] == "norm"  # checkpoints saved before the option were norm-grafted
