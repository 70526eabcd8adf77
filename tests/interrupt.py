"""Interrupting a training run at a chosen epoch, as Ctrl-C would: what every resume test starts from."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def ctrl_c_at_epoch(monkeypatch, epoch: int):
    """While active, training raises KeyboardInterrupt when (0-based) ``epoch`` starts, leaving
    the checkpoint of the epochs before it."""
    from csgguard.train import Trainer

    original = Trainer.run_epoch

    def interrupting(self, e, *a, **k):
        if e == epoch:
            raise KeyboardInterrupt
        return original(self, e, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "run_epoch", interrupting)
        yield
