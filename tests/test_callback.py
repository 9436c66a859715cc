"""MemoryReportCallback: log keys, report files, model card, with the stock Trainer and any optimizer."""

import json
import mmap
import types
import typing

import pytest
import torch

from hf_q4shampoo import Q4Shampoo
from hf_q4shampoo.memory import KINDS, optimizer_state_bytes

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback  # noqa: E402

from hf_q4shampoo.integrations.callback import (  # noqa: E402
    LOG_KEYS,
    SKIPPED_KEY,
    MemoryReportCallback,
    MemoryReportMixin,
    attach_memory_report,
    memory_callback,
)
from hf_q4shampoo.integrations.probe import MemoryProbe  # noqa: E402
from hf_q4shampoo.integrations.render import update_model_card  # noqa: E402
from hf_q4shampoo.integrations.report import REPORT_FILES, SCHEMA, MemoryReportJSON, load_report  # noqa: E402

from tiny_hf import lm_dataset, tiny_gpt2, training_args  # noqa: E402

STEPS = 6
Q4_OPTIONS = {"update_freq": 2, "root_freq": 4}  # statistics and roots happen within the run
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def step_keys(probe_key: str = "peak_rss_mib") -> set[str]:
    return {k for k in LOG_KEYS if not k.startswith("peak_")} | {probe_key}


class Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B): reporters run before user callbacks in on_log."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def make_trainer(tmp_path, optimizer=(Q4Shampoo, Q4_OPTIONS), callbacks=(), trainer_cls=Trainer, **kwargs):
    args = training_args(
        tmp_path, optim="adamw_torch", optim_args=None, max_steps=STEPS, logging_steps=2, per_device_train_batch_size=4
    )
    return trainer_cls(
        model=tiny_gpt2(n_embd=64),
        args=args,
        train_dataset=lm_dataset(32),
        optimizer_cls_and_kwargs=optimizer,
        callbacks=list(callbacks),
        **kwargs,
    )


@pytest.fixture(scope="module")
def q4_run(tmp_path_factory):
    """A stock Trainer with the callback only (way 3): the fallback path."""
    out = tmp_path_factory.mktemp("q4")
    cb = MemoryReportCallback()
    trainer = make_trainer(out, callbacks=[cb])
    result = trainer.train()
    trainer.save_state()
    return types.SimpleNamespace(out=out, cb=cb, trainer=trainer, result=result)


@pytest.fixture(scope="module")
def adamw_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("adamw")
    trainer = make_trainer(out, optimizer=(torch.optim.AdamW, {"lr": 1e-3}), callbacks=[MemoryReportCallback()])
    trainer.train()
    return types.SimpleNamespace(out=out, trainer=trainer)


# ----------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------


@pytest.mark.heavy  # runs Trainer
def test_report_files_exist_parse_and_match_the_optimizer(q4_run):
    files = {kind: q4_run.out / name for kind, name in REPORT_FILES.items()}
    assert all(f.is_file() for f in files.values())
    assert q4_run.cb.files == files
    report = json.loads(files["json"].read_text())
    assert report["schema"] == SCHEMA
    real = optimizer_state_bytes(q4_run.trainer.optimizer)
    measured = report["measured"]
    assert measured["step"] == STEPS
    assert measured["total_bytes"] == real.total > 0
    assert measured["by_kind"] == real.by_kind
    assert measured["num_params"] == real.num_params == sum(p.numel() for p in q4_run.trainer.model.parameters())
    assert [g["bytes"] for g in measured["by_group"]] == real.by_group
    assert len(measured["by_group"]) == 2  # Trainer's decay / no-decay groups
    assert measured["by_group"][0]["weight_decay"] == q4_run.trainer.args.weight_decay
    assert report["equivalents"]["adamw_bytes"] == real.adamw_equivalent
    assert report["equivalents"]["fp32_shampoo_bytes"] == real.fp32_shampoo_equivalent
    assert report["equivalents"]["compression_vs_fp32_shampoo"] == pytest.approx(
        real.fp32_shampoo_equivalent / real.total
    )
    assert report["optimizer"]["config"]["update_freq"] == Q4_OPTIONS["update_freq"]
    # the pre-flight estimate agrees with what was measured after training
    assert abs(report["estimate_relative_error"]) <= 0.02
    assert report["estimate"]["total_bytes"] == pytest.approx(real.total, rel=0.02)
    # largest tensors carry their parameter names, biggest first
    largest = measured["largest"]
    assert largest[0]["bytes"] >= largest[-1]["bytes"]
    names = {n for n, _ in q4_run.trainer.model.named_parameters()}
    assert all(t["name"] in names for t in largest)
    # history: every step was sampled (few steps), peak never decreases
    steps = [h["step"] for h in report["history"]]
    assert steps == list(range(1, STEPS + 1))
    peaks = [h["peak_memory_bytes"] for h in report["history"]]
    assert peaks == sorted(peaks) and peaks[-1] <= report["peak_memory_bytes"]
    assert {a["name"] for a in report["alternatives"]} >= {"adamw", "adamw_8bit_bnb", "q4shampoo_cholesky_ef"}
    assert load_report(q4_run.out) == report
    _check_schema(report, MemoryReportJSON)


def _check_schema(value, typed):
    """``value`` has exactly the keys the TypedDict (and every nested one) declares."""
    hints = typing.get_type_hints(typed)
    assert set(value) <= set(hints) and set(value) >= set(typed.__required_keys__), (typed.__name__, set(value))
    for key, hint in hints.items():
        for sub in (hint, *typing.get_args(hint)):
            if typing.is_typeddict(sub) and isinstance(value.get(key), dict):
                _check_schema(value[key], sub)
            elif typing.get_origin(sub) is list and typing.is_typeddict(typing.get_args(sub)[0]):
                for item in value.get(key) or []:
                    _check_schema(item, typing.get_args(sub)[0])


@pytest.mark.heavy  # runs Trainer
def test_markdown_and_png(q4_run):
    md = (q4_run.out / REPORT_FILES["md"]).read_text()
    assert "## By state kind" in md and "## By parameter group" in md and "## Largest tensors" in md
    for kind in KINDS:
        assert f"| {kind} |" in md
    report = load_report(q4_run.out)
    assert report["measured"]["largest"][0]["name"] in md
    png = (q4_run.out / REPORT_FILES["png"]).read_bytes()
    assert png.startswith(PNG_MAGIC)
    import matplotlib.image

    image = matplotlib.image.imread(q4_run.out / REPORT_FILES["png"])
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 600


# ----------------------------------------------------------------------------------------------
# logs
# ----------------------------------------------------------------------------------------------


@pytest.mark.heavy  # runs Trainer
def test_log_keys_reach_trainer_state_json_with_the_stock_trainer(q4_run):
    state = json.loads((q4_run.out / "trainer_state.json").read_text())
    train_logs = [e for e in state["log_history"] if "loss" in e]
    assert [e["step"] for e in train_logs] == [2, 4, 6]
    real = optimizer_state_bytes(q4_run.trainer.optimizer)
    for entry in train_logs:
        assert step_keys() <= set(entry)
        assert entry["optim_state_mib"] == pytest.approx(real.total / 2**20, rel=1e-3)
        assert entry["optim_state_bytes_per_param"] == pytest.approx(real.bytes_per_param, rel=1e-3)
        assert entry["optim_state_compression_vs_fp32_shampoo"] > 1
        assert entry["peak_rss_mib"] > 0
    # the final train() metrics carry them too
    assert step_keys() <= set(q4_run.result.metrics)


@pytest.mark.heavy  # runs Trainer
def test_fallback_path_misses_earlier_reporters_and_warns(tmp_path, caplog):
    recorder = Recorder()
    trainer = make_trainer(
        tmp_path, callbacks=[recorder, MemoryReportCallback(write_files=False, print_estimate=False)]
    )
    trainer.args.report_to = ["tensorboard"]  # only read by the warning; no TensorBoard callback is built
    with caplog.at_level("WARNING"):
        trainer.train()
    assert all("optim_state_mib" not in logs for logs in recorder.logs)  # ran before the callback
    assert any("optim_state_mib" in e for e in trainer.state.log_history)
    assert sum("not tensorboard" in r.message for r in caplog.records) == 1


@pytest.mark.heavy  # runs Trainer
def test_attach_memory_report_reaches_every_reporter_and_the_model_card(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder])
    cb = attach_memory_report(trainer, MemoryReportCallback(print_estimate=False))
    assert attach_memory_report(trainer) is cb and memory_callback(trainer) is cb  # idempotent
    trainer.train()
    train_logs = [logs for logs in recorder.logs if "loss" in logs]
    assert len(train_logs) == 3 and all(step_keys() <= set(logs) for logs in train_logs)
    assert step_keys() <= set(trainer.state.log_history[0])

    trainer.create_model_card(model_name="tiny")
    trainer.create_model_card(model_name="tiny")  # a second call replaces the section
    card = (tmp_path / "README.md").read_text()
    assert card.count("## Optimizer memory") == 1
    assert "Q4Shampoo (cholesky_ef)" in card and "fp32 Shampoo" in card
    assert "tiny" in card  # Trainer's own card is still there


@pytest.mark.heavy  # runs Trainer
def test_adamw_run_and_comparison(adamw_run, q4_run, tmp_path):
    adamw = load_report(adamw_run.out)
    assert adamw["optimizer"]["class"] == "AdamW" and adamw["optimizer"]["config"] is None
    real = optimizer_state_bytes(adamw_run.trainer.optimizer)
    assert adamw["measured"]["total_bytes"] == real.total
    assert adamw["measured"]["bytes_per_param"] == pytest.approx(8.0, abs=0.01)
    assert adamw["measured"]["by_kind"]["first_order"] == real.total
    assert adamw["equivalents"]["compression_vs_adamw"] == pytest.approx(1.0, abs=0.01)
    # fp32 Shampoo equivalent of an AdamW run uses Q4Shampoo's default blocks, as the Q4 run's does
    assert adamw["equivalents"]["fp32_shampoo_bytes"] == load_report(q4_run.out)["equivalents"]["fp32_shampoo_bytes"]
    assert abs(adamw["estimate_relative_error"]) <= 0.02

    cb = MemoryReportCallback(print_estimate=False, compare_with=[adamw_run.out / REPORT_FILES["json"]])
    trainer = make_trainer(tmp_path, callbacks=[cb])
    trainer.train()
    report = load_report(tmp_path)
    assert report["compared"][0]["label"] == "AdamW"
    assert report["compared"][0]["total_bytes"] == real.total
    assert "## Compared runs" in (tmp_path / REPORT_FILES["md"]).read_text()
    assert (tmp_path / REPORT_FILES["png"]).read_bytes().startswith(PNG_MAGIC)


# ----------------------------------------------------------------------------------------------
# mixin, model card, probe, history
# ----------------------------------------------------------------------------------------------


class MixinTrainer(MemoryReportMixin, Trainer):
    pass


@pytest.mark.heavy  # runs Trainer
def test_mixin_attaches_by_default_and_opts_out(tmp_path):
    recorder = Recorder()
    trainer = make_trainer(tmp_path, callbacks=[recorder], trainer_cls=MixinTrainer)
    assert isinstance(memory_callback(trainer), MemoryReportCallback)
    trainer.train()
    assert all(step_keys() <= set(logs) for logs in recorder.logs if "loss" in logs)
    assert (tmp_path / REPORT_FILES["json"]).is_file()

    off = make_trainer(tmp_path / "off", trainer_cls=MixinTrainer, memory_report=False)
    assert memory_callback(off) is None
    mine = MemoryReportCallback(largest=3)
    chosen = make_trainer(tmp_path / "mine", trainer_cls=MixinTrainer, memory_report=mine)
    assert memory_callback(chosen) is mine


@pytest.mark.heavy  # runs Trainer
def test_mixin_model_card_with_a_trl_like_signature(tmp_path, q4_run):
    class TrlLikeBase:
        """TRL's create_model_card(model_name, dataset_name, tags) writes README.md on every save."""

        def __init__(self):
            self.args = types.SimpleNamespace(output_dir=str(tmp_path))
            self.callback_handler = types.SimpleNamespace(callbacks=[q4_run.cb])

        def is_world_process_zero(self):
            return True

        def create_model_card(self, model_name=None, dataset_name=None, tags=None):
            (tmp_path / "README.md").write_text(f"---\ntags: {tags}\n---\n# {model_name}\n")
            return "card"

    class TrlLike(MemoryReportMixin, TrlLikeBase):
        pass

    trainer = TrlLike.__new__(TrlLike)
    TrlLikeBase.__init__(trainer)
    assert trainer.create_model_card("m", dataset_name="d", tags=["x"]) == "card"
    assert trainer.create_model_card(model_name="m") == "card"
    card = (tmp_path / "README.md").read_text()
    assert card.startswith("---\ntags: None") and card.count("## Optimizer memory") == 1


@pytest.mark.heavy  # runs Trainer
def test_update_model_card_is_idempotent(tmp_path, q4_run):
    readme = tmp_path / "README.md"
    readme.write_text("# My model\n\nText after.\n")
    report = load_report(q4_run.out)
    update_model_card(readme, report)
    once = readme.read_text()
    update_model_card(readme, report)
    assert readme.read_text() == once
    assert once.startswith("# My model") and once.count("<!-- hf_q4shampoo:memory-report:start -->") == 1


@pytest.mark.heavy  # runs Trainer
def test_eval_logs_get_no_memory_keys(q4_run):
    assert q4_run.cb.log_metrics({"eval_loss": 1.0}) == {}
    assert q4_run.cb.log_metrics({"loss": 1.0, "optim_state_mib": 1.0}) == {}
    assert set(q4_run.cb.log_metrics({"loss": 1.0})) == step_keys() | {SKIPPED_KEY}
    assert MemoryReportCallback().log_metrics({"loss": 1.0}) == {}  # not bound: training has not begun


def test_skipped_updates_reach_the_training_logs():
    model = torch.nn.Sequential(torch.nn.Linear(40, 30), torch.nn.Linear(30, 5))
    opt = Q4Shampoo(model.parameters(), lr=1e-2, update_freq=1, root_freq=2)
    cb = MemoryReportCallback()
    for bad in (False, True, False):
        opt.zero_grad()
        model(torch.randn(4, 40)).square().sum().backward()
        if bad:
            model[0].weight.grad[2, 3] = float("nan")
        opt.step()
    cb.bind(model, opt)
    assert cb.log_metrics({"loss": 1.0})[SKIPPED_KEY] == 1
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    cb_sgd = MemoryReportCallback()
    cb_sgd.bind(model, sgd)
    assert SKIPPED_KEY not in cb_sgd.log_metrics({"loss": 1.0})


def test_history_is_bounded():
    cb = MemoryReportCallback(max_history=4)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    cb.bind(model, opt)
    state = types.SimpleNamespace(global_step=0)
    for step in range(1, 41):
        state.global_step = step
        cb.on_step_end(None, state, None)
    steps = [h["step"] for h in cb._history]
    assert len(steps) <= 5 and steps[0] == 1 and steps == sorted(steps)
    assert steps[-1] >= 32  # recent steps are still sampled


def test_cpu_probe_reads_rss_and_resets_its_peak():
    probe = MemoryProbe("cpu")
    assert probe.kind == "rss" and probe.log_key == "peak_rss_mib"
    probe.reset_peak()
    before = probe.sample()
    # 128 MiB in an anonymous mapping of its own, every page touched: unlike a tensor, which may reuse memory
    # freed by earlier tests and stay resident after `del`, closing the mapping gives the pages back at once
    size = 128 * 2**20
    blob = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        blob[offset] = 1
    current = probe.sample()
    peak = probe.peak()
    assert peak >= current > before + 96 * 2**20
    blob.close()
    probe.reset_peak()
    if probe.peak_since == "train_begin":  # Linux: the high-water mark restarts from the current RSS
        assert probe.peak() < peak - 64 * 2**20
