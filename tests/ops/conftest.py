"""Without a CUDA GPU, Triton kernels run on CPU tensors in Triton's interpreter. The switch is read
when a kernel is decorated (when its module is first imported), so it is set here, before any test
module in this directory imports one."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
