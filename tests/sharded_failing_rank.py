"""Run by tests/test_sharding.py under torchrun: fastprompt.train whose rank 1 fails in its third forward."""
import os
import sys

from fastprompt.engines.generic import GenericEngine
from fastprompt.train import main

if os.environ.get("RANK") == "1":
    calls = [0]
    loss_terms = GenericEngine.loss_terms

    def failing(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected failure on rank 1")
        return loss_terms(self, *args, **kwargs)

    GenericEngine.loss_terms = failing
sys.exit(main(sys.argv[1:]))
