"""PNG figures of the evaluation results (matplotlib, Agg backend: no display needed)."""
from __future__ import annotations

from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_ppl(result: dict, path) -> Path:
    """Perplexity against stream position (log x), one line per policy: StreamingLLM's figure."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for p in result["policies"]:
        c = p["curve"]
        style = dict(marker="o", linestyle="--", markersize=4) if p["mode"] == "sampled" else dict(linewidth=1.6)
        label = (f"{p['label']} ({p['mode']}" + (f", {p['positions_evaluated']} pos" if p["mode"] == "sampled" else "")
                 + f"): ppl {p['ppl']:.1f} over {p['positions_evaluated']:,} positions")
        ax.plot(c["position"], c["ppl"], label=label, **style)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("stream position (tokens)")
    ax.set_ylabel("perplexity (binned)")
    model = result.get("model") or "model"
    ax.set_title(f"Streaming perplexity, {model}, {result['tokens']} tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_passkey(result: dict, path) -> Path:
    """Accuracy heatmap (depth x context length), one panel per policy."""
    plt = _plt()
    pols = result["policies"]
    fig, axes = plt.subplots(1, len(pols), figsize=(3.9 * len(pols) + 1.2, 3.8), squeeze=False)
    im = None
    for ax, p in zip(axes[0], pols):
        lengths, depths = result["lengths"], result["depths"]
        grid = [[p["accuracy"][str(L)][str(d)] for L in lengths] for d in depths]
        im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.2f}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                ax.text(j, i, f"{grid[i][j]:.0%}", ha="center", va="center", fontsize=8)
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("key depth (0 = start)")
        ax.set_title(f"{p['label']}\nmean {p['mean_accuracy']:.0%}", fontsize=9)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_chat(result_rows: list[dict], path, title: str = "Streaming chat") -> Path:
    """Per turn: cache tokens, cache bytes and latency (flat memory is the point)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    turns = list(range(1, len(result_rows) + 1))
    axes[0].plot(turns, [r["tokens_seen"] for r in result_rows], label="tokens seen (stream)")
    axes[0].plot(turns, [r["tokens_cached"] for r in result_rows], label="tokens cached")
    axes[0].set_ylabel("tokens")
    axes[0].legend(fontsize=8)
    axes[1].plot(turns, [r["cache_bytes"] / 2**20 for r in result_rows], label="KV cache")
    axes[1].plot(turns, [r["rss_bytes"] / 2**20 for r in result_rows], label="process RSS")
    axes[1].set_ylabel("MiB")
    axes[1].legend(fontsize=8)
    axes[2].plot(turns, [r["ms_per_token"] for r in result_rows], ".", markersize=3)
    axes[2].set_ylabel("decode ms / token")
    for ax in axes:
        ax.set_xlabel("turn")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title)
    return _save(fig, path)


def plot_bench(result: dict, path) -> Path:
    """Decode latency and RSS against stream position, one line per policy (log x)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    seen: set[str] = set()
    for i, p in enumerate(result["policies"]):
        pts = p["points"]
        x = [q["position"] for q in pts]
        label = None if p["label"] in seen else p["label"]  # one legend entry per engine over --rounds
        seen.add(p["label"])
        color = f"C{list(dict.fromkeys(e['label'] for e in result['policies'])).index(p['label']) % 10}"
        # the median step: one slow step (a compile, a page fault) moves the mean of a few steps a lot
        axes[0].plot(x, [q.get("ms_per_token_median", q["ms_per_token"]) for q in pts], marker="o", markersize=3,
                     label=label, color=color)
        if all("rss_bytes" in q for q in pts):  # the peer's process RSS is not measured
            axes[1].plot(x, [q["rss_bytes"] / 2**20 for q in pts], marker="o", markersize=3, label=label, color=color)
    for ax, yl in zip(axes, ("decode latency (ms / token, median step)", "process RSS (MiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("stream position (tokens)")
        ax.set_ylabel(yl)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    m = result.get("machine", {})
    fig.suptitle(f"{result.get('model')}: {m.get('cpu', '')}, {m.get('torch_threads')} threads, torch {m.get('torch')}",
                 fontsize=9)
    return _save(fig, path)
