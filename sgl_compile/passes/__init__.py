"""FX graph -> FX graph rewrites, applied in a fixed order by the pass manager."""

from sgl_compile.passes.fuse_add_rms_norm import fuse_add_rms_norm
from sgl_compile.passes.fuse_norm_linear import fuse_norm_linear
from sgl_compile.passes.fuse_qk_norm_rope import fuse_qk_norm_rope
from sgl_compile.passes.fuse_rope_attention import fuse_rope_attention
from sgl_compile.passes.fuse_rope_store_kv import fuse_rope_store_kv
from sgl_compile.passes.lower_attention import BATCH_INPUTS, lower_attention
from sgl_compile.passes.manager import Pass, PassReport, run_passes
from sgl_compile.passes.merge_linears import merge_gate_up, merge_qkv
from sgl_compile.passes.prune_logits import prune_logits
from sgl_compile.passes.quantize import METHODS as QUANTIZATION_METHODS
from sgl_compile.passes.quantize import check_method, quantize
from sgl_compile.tokenizer import Tokenizer

# The order the driver applies them in.
DEFAULT_PASSES: list[tuple[str, Pass]] = [
    ("prune_logits", prune_logits),
    ("merge_qkv", merge_qkv),
    ("merge_gate_up", merge_gate_up),
    ("fuse_add_rms_norm", fuse_add_rms_norm),
    ("lower_attention", lower_attention),
    ("fuse_rope_store_kv", fuse_rope_store_kv),
    ("fuse_qk_norm_rope", fuse_qk_norm_rope),
    ("fuse_rope_attention", fuse_rope_attention),
    ("fuse_norm_linear", fuse_norm_linear),
]
# Weight quantization goes before these: they fuse only projections that stay `aten.linear`.
_AFTER_QUANTIZATION = {"fuse_norm_linear"}


def pipeline(quantization: str | None = None, tokenizer: Tokenizer | None = None) -> list[tuple[str, Pass]]:
    """The passes for these options: the defaults, then weight quantization if asked for (int4 calibrates
    on a built-in text, tokenized with the model's tokenizer)."""
    check_method(quantization)
    if not quantization:
        return list(DEFAULT_PASSES)
    before = [p for p in DEFAULT_PASSES if p[0] not in _AFTER_QUANTIZATION]
    after = [p for p in DEFAULT_PASSES if p[0] in _AFTER_QUANTIZATION]
    return [*before, (f"quantize_{quantization}", quantize(quantization, tokenizer)), *after]


__all__ = [
    "BATCH_INPUTS",
    "DEFAULT_PASSES",
    "QUANTIZATION_METHODS",
    "Pass",
    "PassReport",
    "lower_attention",
    "pipeline",
    "prune_logits",
    "run_passes",
]
