"""State sizes of other optimizers, as formulas of their state layouts: the peer rows of the estimate.

How each peer row is computed, per trainable tensor of ``n`` entries whose dtype takes ``s``
bytes per entry:

================================  ==========================================================================
row                               bytes per tensor (source)
================================  ==========================================================================
``adamw``                         ``2 n s + 4``: ``exp_avg`` and ``exp_avg_sq`` in the parameter's dtype and an
                                  fp32 0-d ``step`` (``torch.optim.Adam/AdamW._init_group``; tested against a
                                  real AdamW step).
``adamw_8bit_bnb``                ``n < 4096``: ``8 n`` (fp32 ``state1``/``state2``); otherwise ``2 n + 8
                                  ceil(n / 256)`` (uint8 ``state1``/``state2`` and fp32 ``absmax1``/``absmax2``,
                                  block 256 since bitsandbytes 0.44); plus 2 KiB once for the two 256-entry fp32
                                  quantization maps every state shares; ``step`` is a Python int
                                  (``bitsandbytes/optim/optimizer.py``, ``Optimizer2State.init_state``). As HF
                                  Trainer's ``--optim adamw_bnb_8bit`` sets it up, ``nn.Embedding`` weights keep
                                  32-bit state (``Trainer.create_optimizer`` registers them with
                                  ``GlobalOptimManager``); ``bnb_embeddings_32bit=False`` gives the plain
                                  library layout.
``adamw_4bit_torchao``            ``n >= 4096`` and ``n % block == 0``: ``2 (n / 2 + 4 n / block + 64)``
                                  (per moment: packed uint8 codes, fp32 block scales and a 16-entry fp32 code
                                  table); otherwise ``2 n s`` (``zeros_like(p)``); plus an fp32 ``step``
                                  (``torchao/optim/adam.py`` ``_new_buffer``, ``subclass_4bit.py``
                                  ``OptimState4bit.zeros``). ``block`` is 256, the value HF Trainer's ``--optim
                                  adamw_torch_4bit`` passes by default (``trainer_optimizer.py``); torchao's
                                  own default is 128 (``torchao_block_size=128``).
================================  ==========================================================================
"""

from __future__ import annotations

import math
from collections import Counter

import torch

__all__ = ["adamw_bytes", "bnb_8bit_bytes", "torchao_4bit_bytes", "HOW", "ShapeKey", "TRAINER_TORCHAO_BLOCK"]

#: bitsandbytes: tensors with fewer entries keep 32-bit state (``min_8bit_size``); block size of absmax.
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK = 256
BNB_SHARED_QMAP_BYTES = 2 * 256 * 4
#: torchao: tensors with fewer entries stay unquantized; each quantized moment has a 16-entry fp32 qmap.
TORCHAO_MIN_NUMEL = 4096
TORCHAO_QMAP_BYTES = 16 * 4
TRAINER_TORCHAO_BLOCK = 256
#: fp32 0-d ``step`` tensor of torch's and torchao's Adam.
STEP_BYTES = 4

#: A trainable tensor's (shape, dtype); the formulas take a census: how many tensors of each.
ShapeKey = tuple[tuple[int, ...], torch.dtype]


def adamw_bytes(census: Counter[ShapeKey]) -> int:
    return sum((2 * math.prod(s) * d.itemsize + STEP_BYTES) * c for (s, d), c in census.items())


def bnb_8bit_bytes(census: Counter[ShapeKey], embeddings: Counter[ShapeKey], embeddings_32bit: bool) -> int:
    total = 0
    any_8bit = False
    for key, count in census.items():
        n = math.prod(key[0])
        n32 = embeddings.get(key, 0) if embeddings_32bit else 0
        if n < BNB_MIN_8BIT_SIZE:
            n32 = count
        total += 8 * n * n32
        n8 = count - n32
        if n8:
            any_8bit = True
            total += (2 * n + 8 * math.ceil(n / BNB_BLOCK)) * n8
    return total + (BNB_SHARED_QMAP_BYTES if any_8bit else 0)


def torchao_4bit_bytes(census: Counter[ShapeKey], block_size: int) -> int:
    total = 0
    for (shape, dtype), count in census.items():
        n = math.prod(shape)
        if n >= TORCHAO_MIN_NUMEL and n % block_size == 0:
            per_moment = n // 2 + 4 * (n // block_size) + TORCHAO_QMAP_BYTES
        else:
            per_moment = n * dtype.itemsize
        total += (2 * per_moment + STEP_BYTES) * count
    return total


#: How each peer row is computed, in one line (printed by ``q4shampoo memory``).
HOW = {
    "adamw": "2·n·s + 4 per tensor (m, v in the parameter dtype, fp32 step); torch.optim.AdamW",
    "adamw_8bit_bnb": (
        "n < 4096: 8·n; else 2·n + 8·ceil(n/256) (uint8 m, v + fp32 absmax per 256-block), + 2 KiB shared "
        "qmaps; {emb}; bitsandbytes Optimizer2State.init_state"
    ),
    "adamw_4bit_torchao": (
        "n ≥ 4096 and n % {block} == 0: 2·(n/2 + 4·n/{block} + 64) (packed codes, fp32 scales, qmap); "
        "else 2·n·s; + 4 (step); torchao AdamW4bit, block_size={block}"
    ),
}
