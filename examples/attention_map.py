"""Which tokens each token attends to, in one layer and head of all-MiniLM-L6-v2.

Runs the numpy encoder of ``minilm_embeddings.py`` up to the chosen layer, takes that layer's
queries and keys (its ``MultiHeadAttention.project_qkv``) and asks ``numba_attn.attention_weights``
for softmax(Q·Kᵀ/√d): row i says how much token i draws from each token's value. Prints, for every
token, the tokens it attends to most, and the whole matrix when the sentence is short; ``--plot``
also writes a heat map (needs matplotlib).

    python examples/attention_map.py                       # layer 0, head 2: each token looks at the one before
    python examples/attention_map.py "The cat sat on the mat because it was tired." --layer 5 --head 11
    python examples/attention_map.py --layer 3 --head mean --plot attention.png

(Layer 5, head 11 sends almost every token to the subject, "cat"; most heads put much of their
weight on [CLS], a common "no-op" sink.)
"""

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from minilm_embeddings import MiniLM, set_threads

import numba_attn

DEFAULT_SENTENCE = "The cat sat on the mat because it was tired."


def attention_map(model, sentence, layer, head):
    """(weights (T, T), tokens): head ``head`` (an int, or "mean" over heads) of layer ``layer``."""
    if not 0 <= layer < model.num_layers:
        raise ValueError(f"layer must be 0 … {model.num_layers - 1}, got {layer}")
    q, k, tokens = model.qk(layer, sentence)  # (1, heads, T, head_dim)
    w = numba_attn.attention_weights(q[0], k[0])  # (heads, T, T)
    if head == "mean":
        return w.mean(axis=0), tokens
    head = int(head)
    if not 0 <= head < model.num_heads:
        raise ValueError(f"head must be 0 … {model.num_heads - 1} or 'mean', got {head}")
    return w[head], tokens


def print_table(weights, tokens, top=3, matrix_up_to=16):
    width = max(len(t) for t in tokens)
    print(f"{'token':>{width + 4}}  attends most to")
    for i, (t, row) in enumerate(zip(tokens, weights)):
        best = np.argsort(-row, kind="stable")[:top]
        cells = "  ".join(f"{tokens[j]}[{j}] {row[j]:.2f}" for j in best)
        print(f"[{i:2d}] {t:>{width}}  {cells}")
    if len(tokens) <= matrix_up_to:
        print("\nweights ×100 (row: query token, column: key token)")
        cw = max(4, max(len(t) for t in tokens) + 1)
        print(" " * (width + 1) + "".join(f"{t[: cw - 1]:>{cw}}" for t in tokens))
        for t, row in zip(tokens, weights):
            print(f"{t:>{width}} " + "".join(f"{100 * v:{cw}.0f}" for v in row))


def plot(weights, tokens, title, path):
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "--plot needs matplotlib, which is not installed: pip install matplotlib "
            "(or pip install -e '.[plot]'); the table above shows the same weights"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tokens)
    fig, ax = plt.subplots(figsize=(1.5 + 0.45 * n, 1.2 + 0.45 * n))
    im = ax.imshow(weights, cmap="viridis", vmin=0.0, vmax=float(weights.max()))
    ax.set_xticks(range(n), tokens, rotation=90)
    ax.set_yticks(range(n), tokens)
    ax.set_xlabel("key token (attended to)")
    ax.set_ylabel("query token")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"\nheat map written to {path}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sentence", nargs="?", default=DEFAULT_SENTENCE)
    ap.add_argument("--layer", type=int, default=0, help="layer 0 … 5 (default 0)")
    ap.add_argument("--head", default="2", help="head 0 … 11, or 'mean' over heads (default 2)")
    ap.add_argument("--top", type=int, default=3, help="tokens listed per row")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--plot", metavar="FILE.png", help="also write a heat map (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.threads:
        set_threads(args.threads)
    model = MiniLM()
    weights, tokens = attention_map(model, args.sentence, args.layer, args.head)
    title = f"all-MiniLM-L6-v2 layer {args.layer}, head {args.head}"
    print(f"{title}: {args.sentence!r}\n")
    print_table(weights, tokens, args.top)
    if args.plot:
        plot(weights, tokens, title, args.plot)
    return weights, tokens


if __name__ == "__main__":
    main()
