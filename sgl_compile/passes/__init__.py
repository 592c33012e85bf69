"""FX graph -> FX graph rewrites, applied in a fixed order by the pass manager."""

from sgl_compile.passes.fuse_add_rms_norm import fuse_add_rms_norm
from sgl_compile.passes.lower_attention import BATCH_INPUTS, lower_attention
from sgl_compile.passes.manager import Pass, PassReport, run_passes
from sgl_compile.passes.merge_linears import merge_gate_up, merge_qkv
from sgl_compile.passes.prune_logits import prune_logits

# The order the driver applies them in.
DEFAULT_PASSES: list[tuple[str, Pass]] = [
    ("prune_logits", prune_logits),
    ("merge_qkv", merge_qkv),
    ("merge_gate_up", merge_gate_up),
    ("fuse_add_rms_norm", fuse_add_rms_norm),
    ("lower_attention", lower_attention),
]

__all__ = [
    "BATCH_INPUTS",
    "DEFAULT_PASSES",
    "Pass",
    "PassReport",
    "lower_attention",
    "prune_logits",
    "run_passes",
]
