"""Today's optimizer states written back in the layouts of older checkpoints, for the load-and-upgrade tests."""

import torch

from hf_q4shampoo import log_scales


def old_scale_format(tree, dtype, found, path=""):
    """A state of today's layout in an older one: every one-byte block scale decoded to ``dtype`` (bf16: the
    layout of 2026-12-01; fp32, moved off the bf16 grid: before that), the exponents dropped."""
    items = list(tree.items()) if isinstance(tree, dict) else list(enumerate(tree))
    for key, value in items:
        if isinstance(value, (dict, list)):
            old_scale_format(value, dtype, found, f"{path}.{key}")
        elif isinstance(key, str) and key.endswith(("_scales", "_diag_block_upper_scale")):
            assert value.dtype == torch.uint8, key
            stem = key[: -len("_scales")] if key.endswith("_scales") else key[: -len("_diag_block_upper_scale")]
            exponent = tree[f"{stem}_scale_exp"]
            decoded = log_scales.decode_scales(value, exponent)
            if key.endswith("_upper_scale"):  # fp32 holding a bf16 value in both older layouts
                tree[key] = decoded.to(torch.bfloat16).float()
            else:
                tree[key] = decoded.to(dtype) if dtype == torch.bfloat16 else decoded * (1 + 2**-12)
            found.append(f"{path}.{key}")
    if isinstance(tree, dict):
        for key in [k for k in tree if isinstance(k, str) and k.endswith("_scale_exp")]:
            del tree[key]
        for key in [k for k in tree if isinstance(k, str) and k.startswith("exp_avg_sq_max")]:
            assert tree[key].dtype == torch.bfloat16, key
            tree[key] = tree[key].float()  # fp32 in both older layouts
            found.append(f"{path}.{key}")
        if "root_diag_scale" in tree:  # an fp32 diagonal in both older layouts
            tree["root_diag"] = tree["root_diag"].float() * tree.pop("root_diag_scale").unsqueeze(-1)
            found.append(f"{path}.root_diag")
