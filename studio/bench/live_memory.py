"""Peak bytes of live tensors during a block of code, on any device (CPU has no allocator stats and
process RSS is blurred by the C allocator keeping freed pages).

    with LiveTensorBytes().ignore(model.parameters(), model.buffers()) as meter:
        loss.backward(); optimizer.step()
    meter.peak  # bytes of tensor storages alive at once, beyond the ignored ones

It sees every tensor an operator returns (forward, backward, optimizer), counts each storage once
(views share it) and subtracts it when the storage is freed.
"""
import itertools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.current = 0
        self.peak = 0
        self._seen = set()
        self._kept = []  # ignored storages stay referenced so their ids are not reused

    def ignore(self, *tensor_iterables):
        """Tensors that exist already (weights, inputs): never counted, also not through views."""
        for t in itertools.chain(*tensor_iterables):
            storage = t.untyped_storage()
            self._seen.add(id(storage))
            self._kept.append(storage)
        return self

    def _free(self, key, nbytes):
        self._seen.discard(key)
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                key = id(storage)
                if key not in self._seen:
                    self._seen.add(key)
                    nbytes = storage.nbytes()
                    self.current += nbytes
                    weakref.finalize(storage, self._free, key, nbytes)
                    self.peak = max(self.peak, self.current)
        return out
