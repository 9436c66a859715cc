"""What a person reads of a memory report: ``memory_report.md``, ``memory_report.png`` and the model-card section.

Every function takes the report dict that :func:`hf_q4shampoo.integrations.report.build_report` returns (schema:
:class:`~hf_q4shampoo.integrations.report.MemoryReportJSON`). No transformers import.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

from ..memory import KINDS
from .report import MIB, REPORT_FILES, SCHEMA, MemoryReportJSON

__all__ = ["render_markdown", "plot_memory_report", "write_report_files", "model_card_section", "update_model_card"]

logger = logging.getLogger(__name__)

_MARK_START = "<!-- hf_q4shampoo:memory-report:start -->"
_MARK_END = "<!-- hf_q4shampoo:memory-report:end -->"


def write_report_files(report: MemoryReportJSON, output_dir: str | os.PathLike, plot: bool = True) -> dict[str, Path]:
    """Write ``memory_report.json`` / ``.md`` / ``.png`` into ``output_dir``; returns their paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / REPORT_FILES["json"], "md": out / REPORT_FILES["md"]}
    files["json"].write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    files["md"].write_text(render_markdown(report), encoding="utf-8")
    if plot:
        try:
            plot_memory_report(report, out / REPORT_FILES["png"])
            files["png"] = out / REPORT_FILES["png"]
        except ImportError:
            logger.warning("memory report: matplotlib is not installed; no memory_report.png.")
    return files


def _mib(n: float) -> str:
    return f"{n / MIB:,.2f} MiB"


def _memory_name(kind: str, since: str) -> str:
    what = {"rss": "RSS (CPU process)", "cuda": "CUDA allocated", "xpu": "XPU allocated", "mps": "MPS allocated"}[kind]
    return f"Peak {what}" + (", since train begin" if since == "train_begin" else ", since process start")


def _summary_rows(report: MemoryReportJSON) -> list[str]:
    m, eq = report["measured"], report["equivalents"]
    n = max(1, m["num_params"])
    rows = [
        "| | state | bytes / param | vs this run |",
        "|---|---:|---:|---:|",
        f"| **this run: {report['optimizer']['label']}, measured at step {m['step']}** | "
        f"**{_mib(m['total_bytes'])}** | **{m['bytes_per_param']:.2f}** | 1.00x |",
    ]
    if report.get("estimate"):
        e = report["estimate"]
        err = report["estimate_relative_error"]
        rows.append(
            f"| pre-flight estimate (measured differs by {err:+.2%}) | {_mib(e['total_bytes'])} | "
            f"{e['bytes_per_param']:.2f} | {e['total_bytes'] / max(1, m['total_bytes']):.2f}x |"
        )
    for label, b in (
        ("fp32 Shampoo, same blocks (equivalent)", eq["fp32_shampoo_bytes"]),
        ("AdamW, fp32 m and v (equivalent)", eq["adamw_bytes"]),
    ):
        rows.append(f"| {label} | {_mib(b)} | {b / n:.2f} | {b / max(1, m['total_bytes']):.2f}x |")
    return rows


def render_markdown(report: MemoryReportJSON) -> str:
    """``memory_report.md``: summary, by kind, by group, largest tensors, other optimizers, compared runs."""
    m, eq, dev = report["measured"], report["equivalents"], report["device"]
    model = report.get("model") or {}
    lines = ["# Optimizer memory report", ""]
    head = f"{model.get('class', 'model')}, {m['num_params']:,} parameters with optimizer state" if model else ""
    lines.append(
        f"{head}; {report['optimizer']['label']}; device {dev['type']}; step {m['step']}; {report['created']}."
    )
    lines += ["", *_summary_rows(report), ""]
    lines.append(
        f"Compression: **{eq['compression_vs_fp32_shampoo']:.2f}x** vs fp32 Shampoo, "
        f"**{eq['compression_vs_adamw']:.2f}x** vs AdamW. "
        f"{_memory_name(dev['memory_kind'], dev['peak_since'])}: {_mib(report['peak_memory_bytes'])}."
    )
    lines += ["", "## By state kind", "", "| kind | state | share |", "|---|---:|---:|"]
    total = max(1, m["total_bytes"])
    for kind in KINDS:
        b = m["by_kind"].get(kind, 0)
        lines.append(f"| {kind} | {_mib(b)} | {b / total:.1%} |")
    lines += [
        "",
        "## By parameter group",
        "",
        "| group | parameters | state | bytes / param | lr (initial) | weight_decay |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for g in m["by_group"]:
        lr = "" if g["lr"] is None else f"{g['lr']:.3g}"
        lines.append(
            f"| {g['index']} | {g['num_params']:,} | {_mib(g['bytes'])} | {g['bytes_per_param']:.2f} | "
            f"{lr} | {g['weight_decay']} |"
        )
    lines += [
        "",
        f"## Largest tensors ({len(m['largest'])})",
        "",
        "| parameter | shape | state | bytes / param |",
        "|---|---|---:|---:|",
    ]
    for t in m["largest"]:
        shape = "x".join(map(str, t["shape"]))
        lines.append(f"| {t.get('name', '?')} | {shape} | {_mib(t['bytes'])} | {t['bytes_per_param']:.2f} |")
    if report.get("alternatives"):
        lines += [
            "",
            "## Other optimizers for these parameters (pre-flight estimates)",
            "",
            "| optimizer | state | bytes / param |",
            "|---|---:|---:|",
        ]
        for a in report["alternatives"]:
            lines.append(f"| {a['label']} | {_mib(a['total_bytes'])} | {a['bytes_per_param']:.2f} |")
        lines += ["", "How each is computed: `hf_q4shampoo/estimate.py` and `hf_q4shampoo/peers.py` (docstrings)."]
    if report.get("compared"):
        lines += [
            "",
            "## Compared runs (measured)",
            "",
            "| run | state | bytes / param | peak memory |",
            "|---|---:|---:|---:|",
        ]
        lines.append(
            f"| {report['optimizer']['label']} (this run) | {_mib(m['total_bytes'])} | "
            f"{m['bytes_per_param']:.2f} | {_mib(report['peak_memory_bytes'])} |"
        )
        for c in report["compared"]:
            lines.append(
                f"| {c['label']} (`{c['path']}`) | {_mib(c['total_bytes'])} | {c['bytes_per_param']:.2f} | "
                f"{_mib(c['peak_memory_bytes'])} |"
            )
    if report.get("estimate_error"):
        lines += ["", f"No pre-flight estimate: {report['estimate_error']}"]
    lines += ["", f"Machine-readable: `{REPORT_FILES['json']}` (schema `{SCHEMA}`).", ""]
    return "\n".join(lines)


_KIND_COLORS = {
    "statistics": "#4C72B0",
    "roots": "#55A868",
    "error_feedback": "#8172B2",
    "first_order": "#DD8452",
    "scales_diagonals": "#CCB974",
    "other": "#8C8C8C",
    "indices": "#64B5CD",
    "gram": "#C44E52",
}


def plot_memory_report(report: MemoryReportJSON, path: str | os.PathLike) -> Path:
    """Draw ``memory_report.png``: state by kind vs the equivalents (left), memory over steps (right).

    Uses matplotlib's object API with the Agg canvas, so the caller's pyplot backend is untouched. The
    report's ``compared`` runs (``MemoryReportCallback(compare_with=...)``) are drawn beside it.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m, eq, dev = report["measured"], report["equivalents"], report["device"]
    others = list(report.get("compared") or [])
    fig = Figure(figsize=(12, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax_bar, ax_mem = fig.subplots(1, 2, width_ratios=[1.1, 1])
    n = max(1, m["num_params"])

    # left: horizontal bars, this run stacked by kind
    bars = [
        ("AdamW (fp32 m, v)\nequivalent", eq["adamw_bytes"], "#BBBBBB"),
        ("fp32 Shampoo\n(same blocks) equivalent", eq["fp32_shampoo_bytes"], "#999999"),
    ]
    bars += [(f"{o['label']}\n(measured, other run)", o["total_bytes"], "#C44E52") for o in others]
    labels = [b[0] for b in bars] + [f"{report['optimizer']['label']}\n(this run, measured)"]
    for y, (_, value, color) in enumerate(bars):
        ax_bar.barh(y, value / MIB, color=color, height=0.6)
    left = 0.0
    y_run = len(bars)
    for kind in KINDS:
        value = m["by_kind"].get(kind, 0) / MIB
        if value > 0:
            ax_bar.barh(y_run, value, left=left, color=_KIND_COLORS[kind], height=0.6, label=kind)
            left += value
    values = [b[1] for b in bars] + [m["total_bytes"]]
    xmax = max(values) / MIB
    for y, value in enumerate(values):
        ax_bar.text(
            value / MIB + xmax * 0.01, y, f"{value / MIB:,.1f} MiB\n{value / n:.2f} B/param", va="center", fontsize=8
        )
    ax_bar.set_yticks(range(len(labels)), labels, fontsize=8)
    ax_bar.set_xlim(0, xmax * 1.3)
    ax_bar.set_xlabel("optimizer state (MiB)")
    ax_bar.set_title(
        f"Optimizer state: {eq['compression_vs_fp32_shampoo']:.1f}x smaller than fp32 Shampoo, "
        f"{eq['compression_vs_adamw']:.1f}x vs AdamW",
        fontsize=9,
    )
    ax_bar.legend(fontsize=7, loc="lower right", title="this run, by kind", title_fontsize=7)

    # right: memory over steps
    hist = report["history"]
    steps = [h["step"] for h in hist]
    peak = [h["peak_memory_bytes"] / MIB for h in hist]
    ax_mem.plot(steps, peak, color="#4C72B0", lw=2, marker="o", ms=3, label=f"{report['optimizer']['label']}: peak")
    ax_mem.plot(steps, [h["memory_bytes"] / MIB for h in hist], color="#4C72B0", lw=1, alpha=0.5, label="current")
    for name, equiv, style in (("AdamW", eq["adamw_bytes"], "--"), ("fp32 Shampoo", eq["fp32_shampoo_bytes"], ":")):
        shifted = [(h["peak_memory_bytes"] - h["state_bytes"] + equiv) / MIB for h in hist]
        ax_mem.plot(steps, shifted, color="#555555", ls=style, lw=1.2, label=f"same run with {name} state (est.)")
    for o in others:
        if o.get("history"):
            ax_mem.plot(
                [h["step"] for h in o["history"]],
                [h["peak_memory_bytes"] / MIB for h in o["history"]],
                color="#C44E52",
                lw=2,
                marker="s",
                ms=3,
                label=f"{o['label']}: peak (other run)",
            )
    ax_mem.set_xlabel("step")
    ax_mem.set_ylabel("MiB")
    ax_mem.set_title(_memory_name(dev["memory_kind"], dev["peak_since"]), fontsize=9)
    ax_mem.legend(fontsize=7, loc="best")
    ax_mem.grid(alpha=0.3)

    model = report.get("model") or {}
    fig.suptitle(
        f"{model.get('class', 'model')}: {m['num_params']:,} parameters with state; step {m['step']}; {dev['type']}",
        fontsize=10,
    )
    path = Path(path)
    fig.savefig(path)
    return path


def model_card_section(report: MemoryReportJSON) -> str:
    """The "Optimizer memory" block, between markers so it can be replaced."""
    m, eq, dev = report["measured"], report["equivalents"], report["device"]
    lines = [
        _MARK_START,
        "## Optimizer memory",
        "",
        f"Trained with {report['optimizer']['label']}; optimizer state measured at step {m['step']} by "
        "`hf_q4shampoo`'s `MemoryReportCallback`.",
        "",
        *_summary_rows(report),
        "",
        "| state kind | bytes |",
        "|---|---:|",
        *[f"| {k} | {_mib(m['by_kind'].get(k, 0))} |" for k in KINDS if m["by_kind"].get(k, 0)],
        "",
        f"{_memory_name(dev['memory_kind'], dev['peak_since'])}: "
        f"{_mib(report['peak_memory_bytes'])}. Compression: {eq['compression_vs_fp32_shampoo']:.2f}x vs fp32 "
        f"Shampoo, {eq['compression_vs_adamw']:.2f}x vs AdamW.",
        _MARK_END,
    ]
    return "\n".join(lines)


def update_model_card(readme: str | os.PathLike, report: MemoryReportJSON) -> Path:
    """Add or replace the memory section in the model card ``readme`` (created if missing)."""
    path = Path(readme)
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    section = model_card_section(report)
    pattern = re.compile(re.escape(_MARK_START) + r".*?" + re.escape(_MARK_END), re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: section, text, count=1)
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    path.write_text(text, encoding="utf-8")
    return path
