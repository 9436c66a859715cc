"""Q4ShampooTrainer attaches the memory report by default (issue #4 on top of issue #3)."""

import json

import pytest

pytest.importorskip("transformers")

from hf_q4shampoo.integrations.callback import LOG_KEYS, MemoryReportCallback, memory_callback  # noqa: E402
from hf_q4shampoo.integrations.report import REPORT_FILES, load_report  # noqa: E402
from hf_q4shampoo.memory import optimizer_state_bytes  # noqa: E402

from tiny_hf import q4shampoo_trainer  # noqa: E402

pytestmark = pytest.mark.heavy  # Trainer runs


def _trainer(out, **kwargs):
    return q4shampoo_trainer(out, n_embd=64, rows=16, max_steps=4, logging_steps=2, trainer_kwargs=kwargs)


def test_q4shampoo_trainer_writes_the_reports_and_logs_the_keys(tmp_path):
    trainer = _trainer(tmp_path)
    assert isinstance(memory_callback(trainer), MemoryReportCallback)
    trainer.train()
    trainer.save_state()
    for name in REPORT_FILES.values():
        assert (tmp_path / name).is_file()
    report = load_report(tmp_path)
    assert report["optimizer"]["class"] == "Q4Shampoo"
    assert report["measured"]["total_bytes"] == optimizer_state_bytes(trainer.optimizer).total
    assert abs(report["estimate_relative_error"]) <= 0.02
    log_history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    expected = {k for k in LOG_KEYS if not k.startswith("peak_")} | {"peak_rss_mib"}
    assert all(expected <= set(e) for e in log_history if "loss" in e)

    trainer.create_model_card()
    assert (tmp_path / "README.md").read_text().count("## Optimizer memory") == 1


def test_q4shampoo_trainer_memory_report_opt_out(tmp_path):
    trainer = _trainer(tmp_path, memory_report=False)
    assert memory_callback(trainer) is None
    trainer.train()
    assert not (tmp_path / REPORT_FILES["json"]).exists()
    assert all("optim_state_mib" not in e for e in trainer.state.log_history)
