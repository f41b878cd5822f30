"""DuoAttention head patterns: which KV heads need the whole context ("retrieval heads") and which can live with
attention sinks + a recent window ("streaming heads").

A pattern is a float tensor [n_layers, n_kv_heads] of gates in [0, 1]; 1 = full attention. It is stored in
DuoAttention's own file format so that patterns are interchangeable with theirs (mit-han-lab/duo-attention):

    full_attention_heads.tsv: one line per layer, one gate per KV head, tab-separated, written by
    `np.savetxt(path, gates, delimiter="\\t")` (so "%.18e" numbers) and read back by
    `np.loadtxt(path, dtype=float, delimiter="\\t")` followed by `np.clip(gates, 0, 1)`
    (duo_attn/utils.py: save_full_attention_heads, load_attn_pattern; duo_attn/patch/__init__.py:
    load_full_attention_heads). Their trained gates stray slightly outside [0, 1] (e.g. -1.2e-4), hence the clip.

np.loadtxt skips lines starting with "#", so streamkv writes its metadata (method, steps, sink/recent sizes...)
as "#" header lines; upstream's loader reads our files unchanged, and theirs (no header) load here. Upstream keeps
`sink_size`/`recent_size` in a config.json beside the .tsv; `pattern_meta` reads that too when it is there.

`retrieval_heads` turns gates into the boolean decision exactly like upstream's `sparsify_attention_heads`.
"""
from __future__ import annotations

import io
import json
import warnings
from importlib import resources
from pathlib import Path

import numpy as np
import torch

UPSTREAM_FILENAME = "full_attention_heads.tsv"  # the name DuoAttention gives the file inside a pattern folder
EMBEDDED_PATTERN = "smollm2-135m-instruct.tsv"  # shipped in streamkv/patterns/ for the embedded model
_META_PREFIX = "meta: "  # header line "# meta: {json}" carries streamkv's metadata
_TIE_NOISE = 1e-6  # upstream adds U(0, 1e-6) to the gates before thresholding, to break ties


class PatternError(ValueError):
    """A pattern file is missing, malformed, or does not fit the model."""


def _resolve_file(path) -> Path:
    """A pattern path: the .tsv itself, or an upstream pattern folder holding full_attention_heads.tsv."""
    p = Path(path)
    if p.is_dir():
        p = p / UPSTREAM_FILENAME
    if not p.is_file():
        raise PatternError(f"pattern file {p} does not exist; create one with `streamkv duo identify --out {p}` "
                           "or pass a DuoAttention full_attention_heads.tsv (or the folder holding it)")
    return p


def load_pattern(path) -> torch.Tensor:
    """Gates float32 [n_layers, n_kv_heads] in [0, 1] from a DuoAttention .tsv (or the folder holding one).

    Parsed by np.loadtxt with upstream's exact arguments, then clipped to [0, 1] as upstream does."""
    file = _resolve_file(path)
    try:
        with warnings.catch_warnings():  # an empty file warns, then is reported below as an error
            warnings.simplefilter("ignore", UserWarning)
            gates = np.loadtxt(file, dtype=float, delimiter="\t", ndmin=2)  # ndmin: 1 layer or 1 head stays 2-D
    except ValueError as e:
        raise PatternError(f"{file} is not a DuoAttention pattern (tab-separated numbers, one line per layer, "
                           f"one column per KV head): {e}") from None
    if gates.size == 0:
        raise PatternError(f"{file} holds no gates (empty file)")
    if not np.isfinite(gates).all():
        raise PatternError(f"{file} contains NaN or infinite gates")
    return torch.from_numpy(np.clip(gates, 0.0, 1.0)).float()


def pattern_meta(path) -> dict:
    """The metadata of a pattern: streamkv's "# meta: {json}" header, else upstream's config.json beside the .tsv
    (which holds their sink_size / recent_size), else {}."""
    file = _resolve_file(path)
    with open(file, encoding="utf-8") as f:
        for line in f:
            if not line.startswith("#"):
                break
            text = line[1:].strip()
            if text.startswith(_META_PREFIX):
                return json.loads(text[len(_META_PREFIX):])
    config = file.parent / "config.json"
    if file.name == UPSTREAM_FILENAME and config.is_file():
        return json.loads(config.read_text(encoding="utf-8"))
    return {}


def save_pattern(path, gates, meta: dict | None = None) -> Path:
    """Write gates [n_layers, n_kv_heads] in upstream's format (np.savetxt, tab, %.18e), metadata as "#" lines.

    float32 gates round-trip exactly (%.18e prints more digits than a float64 needs). Written to a temporary file
    and renamed, so a crash never leaves half a pattern behind."""
    g = torch.as_tensor(gates).detach().to("cpu", torch.float64).numpy()
    if g.ndim != 2 or g.size == 0:
        raise PatternError(f"gates must be a non-empty 2-D [n_layers, n_kv_heads] tensor, got shape {tuple(g.shape)}")
    if not np.isfinite(g).all():
        raise PatternError("gates contain NaN or infinite values")
    header = ("streamkv DuoAttention head pattern: one line per layer, one tab-separated gate per KV head "
              "(1 = full attention, 0 = streaming)")
    if meta:
        header += "\n" + _META_PREFIX + json.dumps(meta, sort_keys=True)
    buf = io.StringIO()
    np.savetxt(buf, g, delimiter="\t", header=header)  # upstream's call (+ header, which np.loadtxt skips)
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(buf.getvalue(), encoding="utf-8")
    tmp.replace(target)
    return target


def retrieval_heads(gates, sparsity: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """Which heads keep the full context: bool [n_layers, n_kv_heads], exactly upstream's sparsify_attention_heads.

    sparsity: the fraction of all heads that become streaming heads. Upstream takes the `sparsity` quantile of
    the gates (numpy's linear interpolation) as the threshold, so with n distinct gates ceil(sparsity * (n - 1))
    heads stream; sparsity >= 1 streams every head, <= 0 none.
    threshold: used when sparsity is None; heads with gate >= threshold keep full attention (upstream default 0.5).

    Like upstream, U(0, 1e-6) noise is added first so that tied gates (many are exactly 0 or 1) are split rather
    than all landing on one side; unlike upstream the noise has a fixed seed, so the answer is reproducible."""
    if (sparsity is None) == (threshold is None):
        raise ValueError("give exactly one of sparsity (fraction of heads that stream, e.g. 0.5) or threshold "
                         "(gate value a head needs to keep full attention, e.g. 0.5)")
    if sparsity is not None and not (isinstance(sparsity, (int, float)) and 0.0 <= sparsity <= 1.0):
        raise ValueError(f"sparsity must be a number in [0, 1] (the fraction of heads that stream), got {sparsity!r}")
    if threshold is not None and not (isinstance(threshold, (int, float)) and np.isfinite(threshold)):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    g = torch.as_tensor(gates).detach().to("cpu", torch.float64).numpy()
    if g.ndim != 2 or g.size == 0:
        raise ValueError(f"gates must be a non-empty [n_layers, n_kv_heads] tensor, got shape {tuple(g.shape)}")
    g = g + np.random.default_rng(0).uniform(0, _TIE_NOISE, g.shape)
    if sparsity is not None:
        cut = 2.0 if sparsity >= 1 else -1.0 if sparsity <= 0 else np.quantile(g, sparsity)
    else:
        cut = threshold
    return torch.from_numpy(g >= cut)


# ---- the shipped pattern and resolution for a model ---------------------------------------------------
def embedded_pattern() -> torch.Tensor:
    """The pattern shipped for the embedded SmolLM2-135M-Instruct (streamkv/patterns/)."""
    with resources.as_file(resources.files("streamkv") / "patterns" / EMBEDDED_PATTERN) as p:
        return load_pattern(p)


def embedded_pattern_path() -> Path:
    return Path(str(resources.files("streamkv") / "patterns" / EMBEDDED_PATTERN))


def _model_name(model_or_name) -> str | None:
    if model_or_name is None or isinstance(model_or_name, str):
        return model_or_name
    return getattr(model_or_name, "streamkv_name", None)  # set by models.load


def pattern_for(model_or_name, pattern=None) -> torch.Tensor:
    """The gates [n_layers, n_kv_heads] to use for a model (a loaded model, or its streamkv name).

    pattern: a .tsv path (or upstream pattern folder); None or "embedded" = the pattern shipped with streamkv,
    which exists only for the embedded model. A loaded model's shape is checked against the pattern."""
    from .models import EMBEDDED

    name = _model_name(model_or_name)
    if pattern in (None, "", EMBEDDED):
        if name not in (None, "", EMBEDDED):
            raise PatternError(f"streamkv ships a head pattern only for the embedded model, not for {name!r}: run "
                               f"`streamkv duo identify --model {name} --out PATTERN.tsv` (minutes to an hour on a "
                               "CPU) and pass pattern=PATTERN.tsv")
        gates, source = embedded_pattern(), f"the shipped pattern {EMBEDDED_PATTERN}"
    else:
        gates, source = load_pattern(pattern), str(pattern)
    if not isinstance(model_or_name, (str, type(None))):
        check_shape(gates, model_or_name, source)
    return gates


def model_heads(model) -> tuple[int, int]:
    """(n_layers, n_kv_heads) of a model: the shape its pattern must have."""
    cfg = model.config
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def check_shape(gates: torch.Tensor, model, source: str = "the pattern") -> None:
    want = model_heads(model)
    if tuple(gates.shape) != want:
        raise PatternError(f"{source} has {gates.shape[0]} layers x {gates.shape[1]} KV heads but the model has "
                           f"{want[0]} x {want[1]}: it was made for another model; run `streamkv duo identify "
                           "--model <this model> --out PATTERN.tsv` to make one for this model")


__all__ = ["PatternError", "check_shape", "embedded_pattern", "embedded_pattern_path", "load_pattern", "model_heads",
           "pattern_for", "pattern_meta", "retrieval_heads", "save_pattern"]
