"""Run by tests/test_sharding.py under torchrun: fastprompt.train whose rank 1 fails in its third forward
(whichever engine ``auto`` picks)."""
import os
import sys

from fastprompt.engines.fused import FusedEngine
from fastprompt.engines.generic import GenericEngine
from fastprompt.train import main

if os.environ.get("RANK") == "1":
    calls = [0]

    def failing(original):
        def loss_terms(self, *args, **kwargs):
            calls[0] += 1
            if calls[0] == 3:
                raise RuntimeError("injected failure on rank 1")
            return original(self, *args, **kwargs)
        return loss_terms

    for cls in (GenericEngine, FusedEngine):
        cls.loss_terms = failing(cls.loss_terms)
sys.exit(main(sys.argv[1:]))
