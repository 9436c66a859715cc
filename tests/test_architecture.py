"""The package's boundary and layers, as docs/ARCHITECTURE.md draws them, checked on the source (no imports run)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hf_q4shampoo"

#: docs/ARCHITECTURE.md, "Layers": a module imports only modules of lower layers.
LAYERS = {
    "options": -1,  # the option machinery every optimizer's options share
    "capture_guard": -0.5,  # what a CUDA graph capture refuses (caches of host copies call it)
    "config": 0,
    "log_scales": -0.25,  # the one-byte block scales: quant and the Triton kernels read them
    "quant": 0,
    "linalg": 0,
    "blocking": -0.5,  # parameter -> blocks, pure torch: config reads its split rules
    "kernels": 0,
    "mfac_window": 0,
    "integrations.probe": 0,
    "peers": 0,
    "sharded_state": 0,
    "triton_common": 0,  # the optional triton import and what the kernel modules share
    "triton_adamw": 0.5,
    "triton_roots": 0.5,
    "triton_factor": 0.5,
    "triton_precompile": 0.5,  # compiles the Triton kernels a dry run would launch, in parallel
    "triton_gather": 0.5,  # stacks tensors given by their addresses (the graphed update's gradients)
    "step_graph": 0.5,  # a step's update as a CUDA graph: when to capture, replay or run eagerly
    "triton_kernels": 1,  # re-exports the three kernel modules above
    "layout": 1,
    "sparse_mfac_config": 1,
    "q4adamw_config": 1,
    "schedule": 1,
    "moments": 1,  # the first-order moments' storage (codes, zero state, bytes)
    "preconditioner_base": 1.5,  # PreconditionerForm, FormSettings: below the forms
    "cholesky_form": 1.75,
    "preconditioners": 2,  # the other forms, FORMS, make_form; re-exports the two modules above
    "first_order": 2,
    "owner_balance": 1.5,
    "distributed": 2,
    "checkpoint": 2.5,  # Q4Shampoo's state_dict / load_state_dict (a mixin): below optimizer, above distributed
    "refresh": 2.9,  # Q4Shampoo's statistics / root refresh stages (a mixin; the statistics' graphs use graphed_update)
    "direction": 2.7,  # Q4Shampoo's per-step update: L^ G R^, grafting, first-order step (a mixin)
    "warmup": 2.8,  # the first step's warm-ups (copies), run as a dry run for triton_precompile
    "graphed_update": 2.8,  # Q4Shampoo's update as a replayed CUDA graph (a mixin): coverage, key, address table
    "optimizer": 3,
    "sparse_mfac": 3,
    "q4adamw": 3,
    "fidelity": 3,
    "memory": 4,
    "estimate": 5,
    "integrations.optimizer_args": 4.5,  # TrainingArguments -> (optimizer, kwargs); below registration
    "integrations.registration": 5,
    "integrations.report": 5,
    "integrations.render": 6,
    "bench_cli": 0,  # the arguments of `q4shampoo bench` (no torch: a fast --help)
    "bench": 6,
    "estimate_cli": 6,
    "integrations.callback": 7,
    "integrations.gc_freeze": 7,
    "integrations.transformers": 8,
    "launcher": 9,
    "__init__": 10,
    "integrations.__init__": 10,
    "cli": 11,  # reads __version__ from the package
}
#: modules that may import transformers when they are imported (the rest only inside functions, if at all)
TRANSFORMERS_AT_IMPORT = {"integrations.callback", "integrations.gc_freeze", "integrations.transformers"}
#: what the installed package never imports when it is imported: extras, recipes and research tools
NEVER_AT_IMPORT = {"datasets", "evaluate", "peft", "gguf", "sklearn", "matplotlib", "recipes_support", "benchmarks"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).with_suffix("").as_posix().replace("/", ".")
        yield name, ast.parse(path.read_text(encoding="utf-8"))


def _imports(name: str, tree: ast.Module, top_level_only: bool):
    """(absolute module name, at import time) of every import in ``tree``."""
    package = ["hf_q4shampoo", *name.split(".")[:-1]]
    nodes = tree.body if top_level_only else ast.walk(tree)
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None or (node.level and module == ".".join(base)):  # from . import x, y
                for alias in node.names:
                    yield f"{module}.{alias.name}"
            else:
                yield module


def test_every_module_has_a_layer():
    assert {name for name, _ in _modules()} == set(LAYERS)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_imports_point_down_the_layers(name):
    tree = dict(_modules())[name]
    for target in _imports(name, tree, top_level_only=False):
        if not target.startswith("hf_q4shampoo"):
            continue
        inner = target.removeprefix("hf_q4shampoo").lstrip(".") or "__init__"
        while inner not in LAYERS and "." in inner:  # `from .x import name` names a module or a member
            inner = inner.rsplit(".", 1)[0]
        if inner not in LAYERS:  # a member of the package itself (`from . import __version__`)
            inner = "__init__"
        if inner == "integrations":
            inner = "integrations.__init__"
        assert LAYERS[inner] < LAYERS[name], f"{name} (layer {LAYERS[name]}) imports {inner} (layer {LAYERS[inner]})"


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_what_each_module_imports_when_imported(name):
    tree = dict(_modules())[name]
    top = {target.split(".")[0] for target in _imports(name, tree, top_level_only=True)}
    assert not top & NEVER_AT_IMPORT, f"{name} imports {top & NEVER_AT_IMPORT} at import time"
    if name not in TRANSFORMERS_AT_IMPORT:
        assert "transformers" not in top, f"{name} imports transformers at import time"
