"""GCFreezeCallback: Python's full collections kept out of multi-process training steps (issue 16)."""

import gc
import weakref
from types import SimpleNamespace

import pytest

pytest.importorskip("transformers")

from hf_q4shampoo import GCFreezeCallback  # noqa: E402
from hf_q4shampoo.integrations.gc_freeze import wants_gc_freeze  # noqa: E402

from tiny_hf import q4shampoo_trainer  # noqa: E402


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen():
    yield
    gc.unfreeze()


def test_callback_freezes_what_is_alive_and_still_collects_later_garbage(unfrozen):
    cb = GCFreezeCallback(refreeze_steps=(3,))
    alive_before = _Cycle()
    cb.on_train_begin(None, SimpleNamespace(global_step=0), None)
    assert cb.frozen_objects > 0 and gc.get_freeze_count() > 0
    assert not any(o is alive_before for o in gc.get_objects())  # frozen: out of the collected generations

    later = _Cycle()  # garbage made during training is a cycle only a collection frees
    ref = weakref.ref(later)
    del later
    gc.collect()
    assert ref() is None

    kept = _Cycle()  # an object that lives on, created by the first steps
    cb.on_step_end(None, SimpleNamespace(global_step=2), None)
    assert any(o is kept for o in gc.get_objects())  # not a refreeze step: still collected
    cb.on_step_end(None, SimpleNamespace(global_step=3), None)
    assert not any(o is kept for o in gc.get_objects())
    assert len(cb.collect_ms) == 2

    cb.on_train_end(None, SimpleNamespace(global_step=3), None)
    assert gc.get_freeze_count() == 0 and cb.frozen_objects == 0


@pytest.mark.parametrize("bad", [(0,), (-1,), (1.5,), (True,), ("10",)])
def test_refreeze_steps_are_validated(bad):
    with pytest.raises(ValueError, match="refreeze_steps"):
        GCFreezeCallback(refreeze_steps=bad)


def test_default_is_on_with_several_processes_only():
    assert wants_gc_freeze(None, 1) is False
    assert wants_gc_freeze(None, 2) is True
    assert wants_gc_freeze(True, 1) is True
    assert wants_gc_freeze(False, 8) is False
    with pytest.raises(TypeError, match="gc_freeze"):
        wants_gc_freeze("yes", 2)


def _trainer(out, **kwargs):
    return q4shampoo_trainer(out, max_steps=2, trainer_kwargs=dict(memory_report=False, **kwargs))


def _freezers(trainer):
    return [c for c in trainer.callback_handler.callbacks if isinstance(c, GCFreezeCallback)]


@pytest.mark.heavy
def test_trainer_attaches_it_on_request_and_unfreezes_after_training(tmp_path, unfrozen):
    assert _freezers(_trainer(tmp_path / "single")) == []  # one process: off by default
    trainer = _trainer(tmp_path / "on", gc_freeze=True)
    (cb,) = _freezers(trainer)
    trainer.train()
    assert len(cb.collect_ms) == 2  # at the start and after step 1
    assert gc.get_freeze_count() == 0
    with pytest.raises(TypeError, match="gc_freeze"):
        _trainer(tmp_path / "bad", gc_freeze=1)
    # False means never, also against a callback attached before (the launcher's wrapper, or callbacks=[...])
    assert _freezers(_trainer(tmp_path / "off", gc_freeze=False, callbacks=[GCFreezeCallback()])) == []
