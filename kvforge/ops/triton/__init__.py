"""Triton GPU kernels, each with a torch reference of the same signature in `kvforge.ops`.

Importing this package imports triton: only the GPU path does, the CPU path never does. On a
machine without a GPU the kernels run on CPU tensors under `TRITON_INTERPRET=1` (set before this
package is first imported), which the tests use.
"""

from kvforge.ops.triton.attention import choose_num_splits, paged_attention, store_kv

__all__ = ["choose_num_splits", "paged_attention", "store_kv"]
