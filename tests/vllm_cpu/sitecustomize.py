"""Test-only: lets the weight push work on vLLM's CPU build. tests/test_vllm.py puts this folder on
PYTHONPATH, so every Python process of those tests (pytest's own, 05 under torchrun, the stages) runs it.

On CPU, vLLM repacks each linear layer's weight for oneDNN once the checkpoint is loaded and frees the
original, so a later `load_weights` has nowhere to write ("'Parameter' object has no attribute
'weight_loader'"). With `vllm._custom_ops._supports_onednn` False the layers keep plain weights and
torch's linear, and the push works. GPU builds never repack this way: this stays out of vlaa/.

The flag is set when vllm._custom_ops is first imported, not here: importing vLLM costs seconds, and most
processes never do.
"""

import importlib.abc
import importlib.util
import sys


class _KeepPlainWeights(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "vllm._custom_ops":
            return None
        sys.meta_path.remove(self)  # find the real module the usual way, once
        spec = importlib.util.find_spec(name)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            module._supports_onednn = False

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _KeepPlainWeights())
