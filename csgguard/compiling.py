"""``torch.compile`` for csgguard's long loops (training, attacks, screening): fixed shapes, one clear error.

Why a module: on a CPU the inductor backend runs ResNet-20's training step about 1.13x and an
attack's gradient step about 1.3x faster than eager PyTorch (``benchmarks/train_speed.py
--compile``, ``benchmarks/attack_compile.py``), but only when every call has the same shapes: a
graph compiled for any batch size ran an attack step at 0.77x of eager on the same machine, and
each new fixed shape costs another compilation of about a minute. So the training step compiles
per batch size (an epoch has two: full batches and the last one), and an attack's network and a
screener's pass (forward and score as one graph) are called through :class:`FixedBatch`, which
pads every call to one batch size.

Compiling changes how the arithmetic is scheduled, not what it computes (float rounding aside:
``tests/test_train.py`` checks a compiled step against an eager one), so it is a run-time
switch (``--compile``) and never part of what a run, an attack file or a report is.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch

from .errors import CsgguardError


def compile_module(net: torch.nn.Module, device: torch.device, *, mode: str | None = None) -> torch.nn.Module:
    """``net`` compiled for fixed shapes; the module itself (parameters, state_dict) is unchanged.

    ``mode`` is torch.compile's (``None``: its default; ``"reduce-overhead"`` adds CUDA graphs on a GPU)."""
    if device.type != "cuda":  # inductor's C++ build looks for CUDA and warns that a CPU has none
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    # inductor's own lowering calls a helper torch deprecates; the warning is torch's business, not the user's
    warnings.filterwarnings("ignore", message=r".*torch\._prims_common\.check.*", category=FutureWarning)
    return torch.compile(net, dynamic=False, mode=mode)


class FixedBatch(torch.nn.Module):
    """Calls ``net`` on exactly ``size`` rows at a time, whatever the caller's batch.

    A shorter batch is padded with copies of its first row, whose outputs are dropped (so they
    take no part in any gradient); a longer one is cut into ``size``-row pieces. A network
    compiled for fixed shapes then keeps one graph per gradient mode instead of one per batch
    size (an attack's last batch and its restarts on the failures are shorter, and so is a
    screened folder's last batch). Rows must be independent of each other, as in an eval-mode
    network. The output is a tensor with one row per input, or a tuple of such tensors.
    """

    def __init__(self, net: torch.nn.Module, size: int) -> None:
        super().__init__()
        if size < 1:
            raise CsgguardError(f"FixedBatch size must be >= 1, got {size}")
        self.net, self.size = net, int(size)

    def forward(self, x: torch.Tensor):
        n = x.shape[0]
        if n == self.size:
            return self.net(x)
        if n > self.size:
            pieces = [self(x[s:s + self.size]) for s in range(0, n, self.size)]
            if isinstance(pieces[0], torch.Tensor):
                return torch.cat(pieces)
            return tuple(torch.cat(parts) for parts in zip(*pieces, strict=True))
        pad = x[:1].expand(self.size - n, *x.shape[1:])
        out = self.net(torch.cat([x, pad]))
        if isinstance(out, torch.Tensor):
            return out[:n]
        return tuple(o[:n] for o in out)


@contextlib.contextmanager
def compile_errors(what: str):
    """Turn torch.compile's failures (no C++ compiler, an unsupported operation) inside the block
    into one line that names ``--compile`` and the way out; eager code never raises these."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise CsgguardError(f"--compile: torch.compile could not compile {what} "
                            f"({type(exc).__name__}: {first}); rerun without --compile") from None
