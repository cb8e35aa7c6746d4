"""Record, on any device, the tensor operations that would make a CUDA decoding step wait for the GPU.

On CUDA an operation whose result size or value must reach the host (`.item()`, `int(t)`, `nonzero`, boolean
masks, `repeat_interleave` without its output size, ...) synchronises the stream. The same operations run on
the CPU, so a dispatch mode that lists them checks a decoding step for read-backs without a GPU.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from arrag.decoding import DecodingHook

READ_BACKS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::nonzero_static", "aten::masked_select",
              "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal", "aten::is_nonzero",
              "aten::masked_scatter", "aten::bincount"}


class ReadBacks(TorchDispatchMode):
    """`with ReadBacks() as rb:` ... ; while rb.on, every read-back operation's name goes to rb.seen."""

    def __init__(self):
        super().__init__()
        self.on, self.seen = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on:
            name = func._schema.name
            # repeat_interleave with tensor repeats needs the output size, unless the caller gives it
            needs_size = name == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and \
                len(args) == 1 and kwargs.get("output_size") is None
            # indexing with a boolean mask is nonzero in disguise
            masked = name in ("aten::index", "aten::index_put_", "aten::index_put") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()))
            if name in READ_BACKS or needs_size or masked:
                self.seen.append(name)
        return func(*args, **kwargs)


class WatchFrom(DecodingHook):
    """A decoding hook that switches `recorder` on from target `start` (after the first step, which a CUDA
    graph captures) and off when decoding ends; put it first among the hooks."""

    def __init__(self, recorder: ReadBacks, start: int = 2):
        super().__init__()
        self.recorder, self.start = recorder, start

    def before_forward(self, state, target):
        if target == self.start:
            self.recorder.on = True

    def end(self, state):
        self.recorder.on = False
