"""Trainer runs with ``optim="q4shampoo"`` (issue #3): tiny models from configs, CPU, a few steps each.

Every run uses ``--optim_args update_freq=1,root_freq=2`` (tiny_hf.FAST) so statistics and roots are
computed within the first steps, i.e. the preconditioned path is the one being tested.
"""

import os
import warnings
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, get_scheduler

from hf_q4shampoo import (
    Q4Shampoo,
    Q4ShampooTrainer,
    Q4ShampooTrainingArguments,
    make_optimizer_cls_and_kwargs,
)
from hf_q4shampoo.memory import unwrap_optimizer

from tiny_hf import (  # noqa: F401  (one_torch_thread: autouse fixture)
    FAST,
    cls_dataset,
    lm_dataset,
    nested_tensors,
    one_torch_thread,
    tiny_bert_classifier,
    tiny_gpt2,
    trainable_state,
    training_args,
)

pytestmark = pytest.mark.heavy


def _losses(trainer, key="loss"):
    return [h[key] for h in trainer.state.log_history if key in h]


def _falls(values, n=3):
    assert len(values) >= 2 * n, values
    assert all(np.isfinite(values)), values
    return float(np.mean(values[-n:])) < float(np.mean(values[:n]))


class StepRecorder(TrainerCallback):
    """What the optimizer sees at each step: total gradient norm after clipping, and group learning rates."""

    def __init__(self):
        self.grad_norms, self.lrs = [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        self.grad_norms.append(
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        )
        self.lrs.append([float(g["lr"]) for g in optimizer.param_groups])


def _max_relative_change(a, b, start):
    """Largest ||a - b|| / ||b - start|| over parameters: difference relative to how far training moved them."""
    return max(float((a[k] - b[k]).norm() / (b[k] - start[k]).norm().clamp_min(1e-12)) for k in a)


# ---- full runs -------------------------------------------------------------------------------


def test_causal_lm_stock_trainer_schedule_clipping_eval_checkpoints(tmp_path):
    steps, lr, clip = 12, 3e-3, 0.5
    recorder = StepRecorder()
    args = training_args(
        tmp_path,
        max_steps=steps,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=3,
        weight_decay=0.1,
        max_grad_norm=clip,
        eval_strategy="steps",
        eval_steps=4,
        save_strategy="steps",
        save_steps=4,
        save_total_limit=2,
        per_device_eval_batch_size=16,
    )
    trainer = Trainer(
        model=tiny_gpt2(),
        args=args,
        train_dataset=lm_dataset(),
        eval_dataset=lm_dataset(32, seed=1),
        callbacks=[recorder],
    )
    trainer.train()

    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, Q4Shampoo)
    assert _falls(_losses(trainer))
    evals = _losses(trainer, "eval_loss")
    assert len(evals) == steps // 4 and evals[-1] < evals[0]

    # decay / no-decay groups from the Trainer, honoured as given
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("bias" in names[id(p)] or "ln_" in names[id(p)] for p in no_decay["params"])
    assert any(len(p.shape) == 2 for p in decay["params"])
    matrix = next(p for p in decay["params"] if p.ndim == 2 and p.shape[0] == p.shape[1] // 3)  # attention c_attn
    assert "regions" in opt.state[matrix] and int(opt.state[matrix]["step"]) == steps

    # the learning rate each step used is the scheduler's (cosine with warm-up), in both groups
    ref = get_scheduler(
        "cosine", torch.optim.SGD([torch.zeros(1)], lr=lr), num_warmup_steps=3, num_training_steps=steps
    )
    expected = []
    for _ in range(steps):
        expected.append(ref.get_last_lr()[0])
        ref.optimizer.step()
        ref.step()
    assert np.allclose([g[0] for g in recorder.lrs], expected) and np.allclose([g[1] for g in recorder.lrs], expected)

    # clipping ran before the optimizer step, and it had something to clip
    assert max(recorder.grad_norms) <= clip * (1 + 1e-4)
    assert max(_losses(trainer, "grad_norm")) > clip

    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-12", "checkpoint-8"]
    trainer.create_model_card()
    card = (tmp_path / "README.md").read_text()
    assert "q4shampoo" in card.lower() and "root_freq=2" in card


def test_sequence_classifier_q4shampoo_trainer_without_registration_path(tmp_path):
    args = training_args(
        tmp_path, cls=Q4ShampooTrainingArguments, max_steps=16, learning_rate=1e-2, eval_strategy="steps", eval_steps=16
    )

    def accuracy(pred):
        return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}

    trainer = Q4ShampooTrainer(
        model=tiny_bert_classifier(),
        args=args,
        train_dataset=cls_dataset(),
        eval_dataset=cls_dataset(32, seed=1),
        compute_metrics=accuracy,
    )
    assert type(args.optim) is str  # the plain string: nothing registered was needed to parse it
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), Q4Shampoo)
    assert _falls(_losses(trainer), n=4)
    assert 0.0 <= _losses(trainer, "eval_accuracy")[-1] <= 1.0


def test_optimizer_cls_and_kwargs_path_with_tensor_learning_rate(tmp_path):
    # stock TrainingArguments with their default optim: the factory alone selects Q4Shampoo
    args = training_args(tmp_path, optim=TrainingArguments("x").optim, max_steps=6, lr_scheduler_type="linear")
    args.optim_args = FAST
    cls, kwargs = make_optimizer_cls_and_kwargs(args)
    kwargs["lr"] = torch.tensor(args.learning_rate)  # e.g. for torch.compile'd steps: schedulers fill_ it in place
    model = tiny_gpt2()
    start = trainable_state(model)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.train()
    opt = unwrap_optimizer(trainer.optimizer)
    assert isinstance(opt, Q4Shampoo)
    lrs = [g["lr"] for g in opt.param_groups]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs)
    assert float(lrs[0]) == pytest.approx(trainer.lr_scheduler.get_last_lr()[0]) and float(lrs[0]) < args.learning_rate
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _max_relative_change(trainable_state(model), start, {k: torch.zeros_like(v) for k, v in start.items()}) > 0


# ---- checkpoint / resume ---------------------------------------------------------------------


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_matches_uninterrupted_run_and_checkpoint_is_small(tmp_path):
    k, n_embd = 3, 128  # 0.4M parameters: large enough for 4-bit factors (order >= 64)
    common = dict(max_steps=2 * k, save_strategy="steps", save_steps=k)

    straight = Trainer(
        model=tiny_gpt2(n_embd), args=training_args(tmp_path / "straight", **common), train_dataset=lm_dataset()
    )
    straight.train()

    stopped = Trainer(
        model=tiny_gpt2(n_embd),
        args=training_args(tmp_path / "resumed", **common),
        train_dataset=lm_dataset(),
        callbacks=[StopAt(k)],
    )
    stopped.train()
    assert stopped.state.global_step == k
    checkpoint = tmp_path / "resumed" / f"checkpoint-{k}"

    model = tiny_gpt2(n_embd, seed=123)  # different initial weights: everything must come from the checkpoint
    resumed = Trainer(model=model, args=training_args(tmp_path / "resumed", **common), train_dataset=lm_dataset())
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 2 * k

    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert all(torch.equal(a[name], b[name]) for name in a), "resumed run differs from the uninterrupted one"
    opt_a, opt_b = unwrap_optimizer(straight.optimizer), unwrap_optimizer(resumed.optimizer)
    assert _same_state(opt_a.state_dict()["state"], opt_b.state_dict()["state"])

    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    dtypes = {t.dtype for t in nested_tensors(saved["state"])}
    assert torch.uint8 in dtypes  # the 4-bit codes are saved as codes ...
    assert {t.dtype for t in nested_tensors(unwrap_optimizer(resumed.optimizer).state)} >= {
        torch.uint8
    }  # ... and stay codes

    adamw = Trainer(
        model=tiny_gpt2(n_embd),
        args=training_args(tmp_path / "adamw", optim="adamw_torch", optim_args=None, **common),
        train_dataset=lm_dataset(),
        callbacks=[StopAt(k)],
    )
    adamw.train()
    q4_bytes = os.path.getsize(checkpoint / "optimizer.pt")
    adamw_bytes = os.path.getsize(tmp_path / "adamw" / f"checkpoint-{k}" / "optimizer.pt")
    n = sum(p.numel() for p in straight.model.parameters())
    print(
        f"\noptimizer.pt, GPT-2 n_embd={n_embd}, {n} parameters: q4shampoo {q4_bytes} B ({q4_bytes / n:.2f} B/param), "
        f"adamw_torch {adamw_bytes} B ({adamw_bytes / n:.2f} B/param), ratio {q4_bytes / adamw_bytes:.2f}"
    )
    assert q4_bytes < adamw_bytes


def _flag_run_args(tmp_path, optim: str, optim_args: str, learning_rate: float, k: int) -> dict:
    """Check that ``--optim OPTIM --optim_args ARGS`` parses as given, and return the TrainingArguments fields of a
    run of ``2 k`` steps that saves a checkpoint every ``k`` (for the straight-through vs resumed comparisons)."""
    from transformers import HfArgumentParser

    (parsed,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path / "parsed"), "--optim", optim, "--optim_args", optim_args]
    )
    assert parsed.optim.value == optim and parsed.optim_args == optim_args
    return dict(
        optim=optim,
        optim_args=optim_args,
        learning_rate=learning_rate,
        weight_decay=0.01,
        max_steps=2 * k,
        save_strategy="steps",
        save_steps=k,
    )


def _same_state(a, b):
    ta, tb = list(nested_tensors(a)), list(nested_tensors(b))
    return len(ta) == len(tb) > 0 and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))


# ---- gradient accumulation, mixed precision --------------------------------------------------


def test_gradient_accumulation_matches_the_large_batch(tmp_path):
    # fp32 storage isolates the accumulation semantics; with 4-bit storage rounding of the tiny
    # summation-order differences is amplified, so that run is checked for training only.
    reference = FAST + ",precond=fp32,first_order_bits=32"
    start = trainable_state(tiny_gpt2())

    def run(name, optim, optim_args, batch, accumulation):
        args = training_args(
            tmp_path / name,
            optim=optim,
            optim_args=optim_args,
            max_steps=6,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation,
        )
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset())
        trainer.train()
        return trainer

    # transformers itself must make accumulation equivalent (5.2.0 does not: plain SGD differs by ~40%)
    sgd = [trainable_state(run(f"sgd{a}", "sgd", None, 8 // a, a).model) for a in (1, 2)]
    if _max_relative_change(sgd[1], sgd[0], start) > 1e-4:
        pytest.skip("this transformers version's gradient accumulation differs from the large batch even for SGD")

    large = trainable_state(run("large", "q4shampoo", reference, 8, 1).model)
    accumulated = trainable_state(run("accumulated", "q4shampoo", reference, 4, 2).model)
    assert _max_relative_change(accumulated, large, start) < 1e-3
    four_bit = run("accumulated_4bit", "q4shampoo", FAST, 4, 2)
    assert four_bit.state.global_step == 6 and _losses(four_bit)[-1] < _losses(four_bit)[0]
    assert all(torch.isfinite(p).all() for p in four_bit.model.parameters())


def _bf16_cpu_ok():
    try:
        TrainingArguments("x", bf16=True, use_cpu=True)
    except (ValueError, ImportError):
        return False
    return True


@pytest.mark.skipif(not _bf16_cpu_ok(), reason="this CPU / torch build cannot run bf16 autocast")
def test_bf16_mixed_precision(tmp_path):
    model = tiny_gpt2()
    seen = set()
    model.lm_head.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
    trainer = Trainer(model=model, args=training_args(tmp_path, bf16=True, max_steps=8), train_dataset=lm_dataset())
    trainer.train()
    assert trainer.accelerator.mixed_precision == "bf16" and torch.bfloat16 in seen
    assert _losses(trainer)[-1] < _losses(trainer)[0]
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert {t.dtype for t in nested_tensors(unwrap_optimizer(trainer.optimizer).state)} >= {torch.uint8, torch.float32}


def test_fp16_grad_scaler_protocol():
    # fp16 autocast is CUDA-only in accelerate (on CPU it is silently off), so the protocol it uses is
    # checked directly: scaled backward, unscale + inf check inside scaler.step, skipped step on overflow.
    model = tiny_gpt2()
    opt = Q4Shampoo(model.parameters(), lr=1e-3, update_freq=1, root_freq=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    batch = {k: torch.stack([row[k] for row in lm_dataset(8).rows]) for k in ("input_ids", "labels")}
    losses = []
    for step in range(6):
        loss = model(**batch).loss
        losses.append(loss.item())
        scaler.scale(loss).backward()
        if step == 3:  # an overflow: the step must be skipped and the scale lowered
            before = trainable_state(model)
            model.lm_head.weight.grad[0, 0] = float("inf")
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if step == 3:
            assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
            assert scaler.get_scale() < scale
        opt.zero_grad()
    assert losses[-1] < losses[0]
    assert all(int(s["step"]) == 5 for s in opt.state.values())  # 6 steps, one skipped


# ---- Hub flags (no network: the Hub client is replaced at the point of upload) -----------------


class FakeHub:
    """Stands in for transformers' HfApi: records repo creation and a snapshot of each uploaded folder."""

    def __init__(self):
        self.created, self.uploads = [], []

    def create_repo(self, repo_id, token=None, private=None, exist_ok=False, **kwargs):
        self.created.append({"repo_id": repo_id, "private": private})
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, repo_id, folder_path, path_in_repo=None, run_as_future=False, **kwargs):
        files = sorted(
            os.path.relpath(os.path.join(d, f), folder_path) for d, _, fs in os.walk(folder_path) for f in fs
        )
        self.uploads.append(
            {
                "repo_id": repo_id,
                "path_in_repo": path_in_repo,
                "files": files,
                "readme": _read(os.path.join(folder_path, "README.md")),
            }
        )
        if run_as_future:
            done = Future()
            done.set_result(None)
            return done
        return SimpleNamespace(commit_url="fake")


def _read(path):
    return open(path, encoding="utf-8").read() if os.path.exists(path) else None


def test_push_to_hub_flags_pass_through(tmp_path, monkeypatch):
    import transformers.trainer

    hub = FakeHub()
    if hasattr(transformers.trainer, "hf_api"):  # newer 5.x (5.17, 5.23): an HfApi factory
        monkeypatch.setattr(transformers.trainer, "hf_api", lambda: hub)
    else:  # 5.0 / 5.1: huggingface_hub functions imported by name
        monkeypatch.setattr(transformers.trainer, "create_repo", hub.create_repo)
        monkeypatch.setattr(transformers.trainer, "upload_folder", hub.upload_folder)
    args = training_args(
        tmp_path,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        push_to_hub=True,
        hub_model_id="someone/tiny-q4shampoo",
        hub_strategy="checkpoint",
        hub_private_repo=True,
    )
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset())
    trainer.train()
    trainer.push_to_hub(dataset_tags="synthetic")

    assert hub.created == [{"repo_id": "someone/tiny-q4shampoo", "private": True}]
    checkpoint_pushes = [u for u in hub.uploads if u["path_in_repo"] == "last-checkpoint"]
    assert checkpoint_pushes and "optimizer.pt" in checkpoint_pushes[-1]["files"]
    final = hub.uploads[-1]
    assert final["path_in_repo"] is None
    assert {"README.md", "config.json", "model.safetensors", "training_args.bin"} <= set(final["files"])
    assert "q4shampoo" in final["readme"].lower() and "root_freq=2" in final["readme"]
    saved_args = torch.load(tmp_path / "training_args.bin", weights_only=False)
    assert saved_args.optim == "q4shampoo" and saved_args.optim_args == FAST


def test_auto_schedule_follows_the_trainers_run_length(tmp_path):
    # max_steps reaches the optimizer as total_steps; with no optim_args the schedule is the "auto" one
    trainer = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path / "a", optim_args=None, max_steps=40), train_dataset=lm_dataset()
    )
    trainer.create_optimizer()
    opt = unwrap_optimizer(trainer.optimizer)
    assert opt.config.total_steps == 40 and opt.config.schedule() == (1, 10)
    # an epoch-based run: Q4ShampooTrainer fills the length once the Trainer knows it
    from hf_q4shampoo import Q4ShampooTrainer

    epochs = Q4ShampooTrainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "b", optim_args=None, max_steps=-1, num_train_epochs=2),
        train_dataset=lm_dataset(),
    )
    epochs.create_optimizer_and_scheduler(num_training_steps=123)
    assert unwrap_optimizer(epochs.optimizer).config.total_steps == 123


def test_a_run_that_ends_before_its_first_root_warns():
    p = torch.nn.Parameter(torch.randn(80, 80))
    with pytest.warns(UserWarning, match="no inverse root will be computed"):
        Q4Shampoo([p], root_freq=500, first_root_step=0, total_steps=100)
    with pytest.warns(UserWarning, match="no inverse root will be computed"):
        Q4Shampoo([p], root_freq=1000, total_steps=100)  # the "auto" early root (at 200) is past the end too
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Q4Shampoo([p], total_steps=100)  # "auto": roots every 10 steps


# ---- --optim sparse_mfac (issue 17) ---------------------------------------------------------------

SPARSE_MFAC_ARGS = "m=4,k_fraction=0.05,damp=1e-4"


def test_sparse_mfac_flag_trains_checkpoints_and_resumes_exactly(tmp_path):

    from hf_q4shampoo import ConfigError, SparseMFAC
    from hf_q4shampoo.memory import optimizer_state_bytes

    k = 3
    common = _flag_run_args(tmp_path, "sparse_mfac", SPARSE_MFAC_ARGS, learning_rate=1e-2, k=k)
    straight = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path / "straight", **common), train_dataset=lm_dataset()
    )
    straight.train()
    opt = unwrap_optimizer(straight.optimizer)
    assert isinstance(opt, SparseMFAC) and opt.config.m == 4 and opt.config.lr_scaled_decay  # --weight_decay is AdamW's
    decay, no_decay = opt.param_groups  # the Trainer's two groups: two flattened windows
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert int(opt.group_state(0)["step"]) == 2 * k and int(opt.group_state(1)["step"]) == 2 * k
    assert all(np.isfinite(_losses(straight)))
    report = optimizer_state_bytes(straight.optimizer)
    assert report.num_params == sum(p.numel() for p in straight.model.parameters())
    assert report.by_kind["indices"] > 0 and report.by_kind["gram"] == 2 * 4 * 4 * 8

    stopped = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "resumed", **common),
        train_dataset=lm_dataset(),
        callbacks=[StopAt(k)],
    )
    stopped.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{k}"
    resumed = Trainer(
        model=tiny_gpt2(seed=123), args=training_args(tmp_path / "resumed", **common), train_dataset=lm_dataset()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert all(torch.equal(a[name], b[name]) for name in a), "resumed run differs from the uninterrupted one"
    assert _same_state(opt.state_dict()["state"], unwrap_optimizer(resumed.optimizer).state_dict()["state"])
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert {torch.int32, torch.float64, torch.float32} <= {t.dtype for t in nested_tensors(saved["state"])}

    straight.create_model_card()
    assert "sparse_mfac" in (tmp_path / "straight" / "README.md").read_text().lower()

    with pytest.raises(ConfigError, match="unknown optim_args key 'ngrads'. Allowed keys: m, k_fraction"):
        training_args(tmp_path / "bad", optim="sparse_mfac", optim_args="ngrads=1024")  # at argument parsing
    late = training_args(tmp_path / "bad", optim="sparse_mfac", optim_args="m=4")
    object.__setattr__(late, "optim_args", "ngrads=1024")  # changed afterwards: the handler still refuses it
    bad = Trainer(model=tiny_gpt2(), args=late, train_dataset=lm_dataset())
    with pytest.raises(ConfigError, match="unknown optim_args key 'ngrads'. Allowed keys: m, k_fraction"):
        bad.create_optimizer()


# ---- --optim q4adamw (issue 15) -------------------------------------------------------------------

#: tiny GPT-2 (n_embd 32): its largest tensors have 4096 entries, so the threshold is lowered to put the
#: matrices (3072 / 4096 entries) in 4 bit; the vectors keep fp32 moments
Q4ADAMW_ARGS = "variant=factor,min_quant_numel=1024"


def test_q4adamw_flag_trains_checkpoints_and_resumes_exactly(tmp_path):

    from hf_q4shampoo import ConfigError, Q4AdamW

    k = 4
    common = _flag_run_args(tmp_path, "q4adamw", Q4ADAMW_ARGS, learning_rate=3e-3, k=k)
    straight = Trainer(
        model=tiny_gpt2(), args=training_args(tmp_path / "straight", **common), train_dataset=lm_dataset()
    )
    straight.train()
    opt = unwrap_optimizer(straight.optimizer)
    assert isinstance(opt, Q4AdamW) and opt.config.variant == "factor" and opt.config.min_quant_numel == 1024
    decay, no_decay = opt.param_groups  # the Trainer's two groups
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert opt.param_groups[0]["betas"] == (0.9, 0.999) and opt.param_groups[0]["eps"] == 1e-8
    losses = _losses(straight)
    assert _falls(losses, n=2), losses
    c_fc = straight.model.transformer.h[0].mlp.c_fc.weight  # (32, 128): 4-bit m, factored v
    assert {"exp_avg_codes", "exp_avg_sq_row", "exp_avg_sq_col"} <= set(opt.state[c_fc])
    assert int(opt.state[c_fc]["step"]) == 2 * k and opt.skipped_updates() == 0

    stopped = Trainer(
        model=tiny_gpt2(),
        args=training_args(tmp_path / "resumed", **common),
        train_dataset=lm_dataset(),
        callbacks=[StopAt(k)],
    )
    stopped.train()
    checkpoint = tmp_path / "resumed" / f"checkpoint-{k}"
    saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved["q4adamw_config"]["variant"] == "factor"
    assert torch.uint8 in {t.dtype for t in nested_tensors(saved["state"])}
    resumed = Trainer(
        model=tiny_gpt2(seed=123), args=training_args(tmp_path / "resumed", **common), train_dataset=lm_dataset()
    )
    resumed.train(resume_from_checkpoint=str(checkpoint))
    a, b = trainable_state(straight.model), trainable_state(resumed.model)
    assert all(torch.equal(a[name], b[name]) for name in a), "resumed run differs from the uninterrupted one"
    assert _same_state(opt.state_dict()["state"], unwrap_optimizer(resumed.optimizer).state_dict()["state"])

    # a checkpoint of another variant is refused with the option named
    other = Trainer(
        model=tiny_gpt2(),
        train_dataset=lm_dataset(),
        args=training_args(tmp_path / "resumed", **{**common, "optim_args": "variant=4bit,min_quant_numel=1024"}),
    )
    with pytest.raises(ConfigError, match="variant: saved 'factor', now '4bit'"):
        other.train(resume_from_checkpoint=str(checkpoint))

    with pytest.raises(ConfigError, match="Q4AdamW: unknown optim_args key 'update_freq'. Allowed keys: maximize"):
        training_args(tmp_path / "bad", optim="q4adamw", optim_args="update_freq=10")  # at argument parsing
    with pytest.raises(ConfigError, match="variant='8bit' is not valid; allowed values: '4bit', 'factor'"):
        training_args(tmp_path / "bad", optim="q4adamw", optim_args="variant=8bit")


def test_q4adamw_through_q4shampoo_trainer_with_memory_report(tmp_path):
    import json

    from hf_q4shampoo import Q4AdamW

    args = training_args(
        tmp_path, cls=Q4ShampooTrainingArguments, optim="q4adamw", optim_args="min_quant_numel=1024", max_steps=3
    )
    assert args.optim == "q4adamw"
    trainer = Q4ShampooTrainer(model=tiny_gpt2(), args=args, train_dataset=lm_dataset())
    trainer.train()
    assert isinstance(unwrap_optimizer(trainer.optimizer), Q4AdamW)
    report = json.loads((tmp_path / "memory_report.json").read_text())
    assert report["optimizer"]["class"] == "Q4AdamW" and report["optimizer"]["label"] == "Q4AdamW (4bit, m dynamic)"
    assert report["optimizer"]["config"]["variant"] == "4bit"
    assert report["estimate_relative_error"] == 0.0  # the estimate is the optimizer's own build_state
    assert report["measured"]["by_kind"]["scales_diagonals"] > 0
    assert any("optim_skipped_updates" in h for h in trainer.state.log_history)
