"""Find a model's retrieval heads on a CPU, and write them as a DuoAttention pattern (streamkv/heads.py).

Why: DuoAttention (Xiao et al. 2024) keeps the full KV cache only for the few heads that fetch facts from far
back ("retrieval heads") and gives every other head attention sinks + a recent window. Which heads those are is
a property of the model, found once, offline, on short synthetic passkey prompts. Two methods:

* "optimize" (DuoAttention, mit-han-lab/duo-attention duo_attn/train.py): a trainable gate alpha per layer and
  KV head, initialised to 1; each head's attention output is alpha * full + (1 - alpha) * streaming. With the
  model frozen, minimise MSE(final hidden states of the gated model, those of the plain model) at the answer
  positions + reg * mean|alpha|, clamping alpha to [0, 1] after every step. The L1 term pushes every gate
  down; a gate stays up only where streaming attention would change the answer.
* "retrieval" (Wu et al. 2024, "Retrieval Head Mechanistically Explains Long-Context Factuality"): while the
  model copies the pass key from the prompt, a query head scores a hit at a step when the key it attends to
  most is the needle token being produced. Score = hits / needle tokens, averaged over prompts; a KV head gets
  the max over its query heads (its KV cache is shared: if any of its query heads retrieves, evicting its old
  tokens breaks that head, so the most retrieving query head decides; a mean would dilute one retrieval head
  among its non-retrieving siblings).

Where this differs from upstream, and why: one 5-digit pass key in streamkv's passkey filler per prompt
(upstream: 10 passkeys of 32 words in book text, 1k-32k tokens) with the loss at the positions that produce the
answer, so a 135M model on a CPU gets a clean signal from short prompts; float32 instead of bfloat16; lr 0.05
for ~120 steps instead of 0.02 for 2000 (same schedule shape); the target hidden states come from a separate
no-grad forward (upstream duplicates the batch: same numbers); exact sink/recent masks (upstream's "sdpa"
variant; its default block-sparse kernel rounds both to 128-token blocks).

Both run the model through attention functions registered with transformers' `AttentionInterface` and switched
on with `model.set_attn_implementation` (no modeling code is patched); they read their per-layer state from a
small registry keyed by the attention module's `layer_idx`. Both save a checkpoint `<out>.partial.pt` as they
go and pick it up again when rerun with the same settings.
"""
from __future__ import annotations

import contextlib
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from .heads import model_heads, save_pattern

DUO_TRAIN = "streamkv_duo_train"  # attention implementation: gate-mixed full / streaming attention
TOP_KEY = "streamkv_top_key"  # attention implementation: SDPA + records each head's most attended key
METHODS = ("optimize", "retrieval")

# streaming heads see the first `sinks` tokens and the last `recent` ones: DuoAttention's training defaults
# (duo_attn/utils.py parse_args: sink_size 64, recent_size 256)
DEFAULT_SINKS = 64
DEFAULT_RECENT = 256
DEFAULT_CONTEXT = 1024
DEFAULT_STEPS = {"optimize": 120, "retrieval": 40}
DEFAULT_LR = 0.05  # upstream uses 0.02 over 2000 steps; Adam moves a gate ~lr per step, so 120 steps need more
DEFAULT_REG = 0.05  # upstream's reg_weight
SAVE_EVERY_S = 30.0  # checkpoint at most this often (and at the end)


# ---- the registry and the two attention functions ------------------------------------------------------
class _Registry:
    """What the registered attention functions read; set only inside `gated` / `recording_top_keys`."""

    gates: torch.Tensor | None = None  # [n_layers, n_kv_heads]; row layer_idx gates that layer
    sinks: int = 0
    recent: int = 0
    top_rows: int = 0  # TOP_KEY: record the argmax key of the last `top_rows` queries
    top_keys: dict = {}  # layer_idx -> LongTensor [batch, n_query_heads, top_rows]


_reg = _Registry()


def attention_masks(q_len: int, k_len: int, sinks: int, recent: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(causal, streaming) bool masks [q_len, k_len], True = may attend. The q_len queries are the last q_len of
    the k_len positions. Streaming = causal and (key among the first `sinks`, or within the last `recent`
    positions counting the query itself): upstream's generate_streaming_mask (duo_attn/patch/streaming_attn.py)."""
    qpos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # [q, 1] absolute query positions
    kpos = torch.arange(k_len, device=device)[None, :]  # [1, k]
    causal = kpos <= qpos
    return causal, causal & ((kpos < sinks) | (qpos - kpos < recent))


def duo_train_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """alpha * full + (1 - alpha) * streaming attention, alpha = the layer's gate per KV head.

    query [b, Hq, q, D], key/value [b, Hkv, k, D] (un-repeated GQA). Masks are built here from the lengths, so
    batches must be unpadded (all identification data is). Returns ([b, q, Hq, D], None) as transformers expects."""
    if _reg.gates is None:
        raise RuntimeError(f"attention implementation {DUO_TRAIN!r} used outside identify.gated(...)")
    hq, hkv = query.shape[1], key.shape[1]
    causal, streaming = attention_masks(query.shape[2], key.shape[2], _reg.sinks, _reg.recent, query.device)
    full = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling, enable_gqa=True)
    stream = F.scaled_dot_product_attention(query, key, value, attn_mask=streaming, scale=scaling, enable_gqa=True)
    # query head h reads KV head h // (Hq / Hkv) (transformers' repeat_kv layout)
    alpha = _reg.gates[module.layer_idx].to(query.dtype).repeat_interleave(hq // hkv).view(1, hq, 1, 1)
    out = alpha * full + (1 - alpha) * stream  # [b, Hq, q, D]
    return out.transpose(1, 2).contiguous(), None


def top_key_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """Plain causal attention, and for the last `top_rows` queries the key each query head attends to most
    (argmax of the scores = argmax of the softmax; only those rows are scored, no [q, k] matrix is kept)."""
    hq, hkv, k_len = query.shape[1], key.shape[1], key.shape[2]
    causal, _ = attention_masks(query.shape[2], k_len, 0, 0, query.device)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=causal, scale=scaling, enable_gqa=True)
    rows = min(_reg.top_rows, query.shape[2])
    keys = key.repeat_interleave(hq // hkv, dim=1)  # [b, Hq, k, D]
    scores = query[:, :, -rows:] @ keys.transpose(-1, -2)  # [b, Hq, rows, k]
    scores = scores.masked_fill(~causal[-rows:], float("-inf"))
    _reg.top_keys[module.layer_idx] = scores.argmax(dim=-1)  # [b, Hq, rows]
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(DUO_TRAIN, duo_train_attention)
AttentionInterface.register(TOP_KEY, top_key_attention)


@contextlib.contextmanager
def _attention(model, name: str):
    previous = model.config._attn_implementation
    model.set_attn_implementation(name)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


@contextlib.contextmanager
def gated(model, gates: torch.Tensor, sinks: int = DEFAULT_SINKS, recent: int = DEFAULT_RECENT):
    """Inside, `model` mixes full and streaming attention per KV head by `gates` [n_layers, n_kv_heads]
    (1 = full, 0 = sinks + recent window). Gradients flow into `gates` if it requires them."""
    if tuple(gates.shape) != model_heads(model):
        raise ValueError(f"gates have shape {tuple(gates.shape)}, the model needs {model_heads(model)} "
                         "(n_layers x n_kv_heads)")
    _reg.gates, _reg.sinks, _reg.recent = gates, sinks, recent
    try:
        with _attention(model, DUO_TRAIN):
            yield
    finally:
        _reg.gates = None


@contextlib.contextmanager
def recording_top_keys(model, rows: int):
    """Inside, every forward records, per layer, each query head's most attended key for the last `rows`
    queries into the returned dict {layer_idx: LongTensor [batch, n_query_heads, rows]}."""
    _reg.top_rows, _reg.top_keys = rows, {}
    try:
        with _attention(model, TOP_KEY):
            yield _reg.top_keys
    finally:
        _reg.top_rows, _reg.top_keys = 0, {}


# ---- synthetic needle data ---------------------------------------------------------------------------
@dataclass
class NeedleSample:
    """A passkey prompt (streamkv.evaluation.passkey) followed by its answer, as one token sequence."""

    ids: list[int]  # prompt + answer
    prompt_len: int
    needle_start: int  # the key sentence: [needle_start, needle_end)
    needle_end: int
    key: str

    @property
    def answer_positions(self) -> range:
        """Positions whose next token is an answer token (where the model produces the answer)."""
        return range(self.prompt_len - 1, len(self.ids) - 1)


def needle_sample(tokenizer, context: int, seed: int, index: int, sinks: int, recent: int) -> NeedleSample:
    """Sample `index` of a deterministic stream: length in [context/2, context], the whole key sentence (it holds
    the key twice) past the sinks and before the recent window (only there does streaming attention lose it, so
    only there do the prompts tell retrieval heads apart), a fresh 5-digit key each time."""
    from .evaluation.passkey import EvalError, make_key, make_prompt

    rng = random.Random(f"streamkv-identify-{seed}-{index}")
    for _ in range(50):
        length, depth = rng.randint(context // 2, context), rng.uniform(0.0, 1.0)
        key = make_key(seed, length, depth, index)
        try:
            p = make_prompt(tokenizer, length, depth, key)
        except EvalError:  # shorter than the prompt's fixed text
            continue
        if p.key_start >= sinks and len(p.ids) - p.key_end >= recent:  # no part of the key sentence in view
            break
    else:
        raise ValueError(f"context {context} is too short to hide a pass key beyond {sinks} sink and {recent} recent "
                         f"tokens; use --context of at least {2 * (sinks + recent + 64)}")
    answer = tokenizer(" " + key + ".", add_special_tokens=False).input_ids
    return NeedleSample(p.ids + answer, len(p.ids), p.key_start, p.key_end, key)


def _is_digit_token(tokenizer, token: int) -> bool:
    return tokenizer.decode([token]).strip().isdigit()


# ---- settings, checkpoints, progress ------------------------------------------------------------------
@dataclass
class Settings:
    """Everything that determines the result; a checkpoint is resumed only when these match."""

    method: str
    model: str
    steps: int
    context: int
    seed: int
    sink_size: int  # upstream's names (their config.json): tokens a streaming head keeps at the start...
    recent_size: int  # ...and at the end
    lr: float | None  # optimize only
    reg: float | None  # optimize only


def _partial_path(out: Path) -> Path:
    return out.with_name(out.name + ".partial.pt")


def _load_checkpoint(path: Path, settings: Settings) -> dict | None:
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("settings") != asdict(settings):
        raise ValueError(f"{path} is a checkpoint of another run ({state.get('settings')}), not of this one "
                         f"({asdict(settings)}): rerun with those settings to resume it, or delete it to start over")
    return state


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def _progress(total: int, initial: int, desc: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="step", file=sys.stderr, disable=quiet,
                dynamic_ncols=True, mininterval=1.0)


@contextlib.contextmanager
def _frozen(model):
    """Model weights do not need gradients (only the gates do): saves the weight-gradient half of backward."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# ---- method 1: DuoAttention optimisation ----------------------------------------------------------------
def _lr_lambda(steps: int):
    """Upstream's schedule (duo_attn/train.py): linear warm-up over the first fifth, flat, linear decay over the
    last fifth, never below 0.1 of the peak."""
    ramp = max(1, steps // 5)
    return lambda step: min(1.0, max((step + 1) / ramp, 0.1), max((steps - step) / ramp, 0.1))


def optimize_gates(model, tokenizer, settings: Settings, checkpoint: Path | None, quiet: bool = False) -> dict:
    """Train the gates (see the module docstring). Returns {"gates", "seconds", "history"}."""
    n_layers, n_kv = model_heads(model)
    gates = torch.nn.Parameter(torch.ones(n_layers, n_kv))
    opt = torch.optim.AdamW([gates], lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(settings.steps))
    state = _load_checkpoint(checkpoint, settings) if checkpoint else None
    step, seconds, history = 0, 0.0, []
    if state:
        with torch.no_grad():
            gates.copy_(state["gates"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        step, seconds, history = state["step"], state["seconds"], state["history"]

    def save():
        if checkpoint:
            _save_checkpoint(checkpoint, {"settings": asdict(settings), "step": step, "seconds": seconds,
                                          "history": history, "gates": gates.detach().clone(),
                                          "optimizer": opt.state_dict(), "scheduler": sched.state_dict()})

    bar = _progress(settings.steps, step, "duo identify (optimize)", quiet)
    last_save = time.perf_counter()
    model.eval()
    with _frozen(model):
        while step < settings.steps:
            t0 = time.perf_counter()
            s = needle_sample(tokenizer, settings.context, settings.seed, step, settings.sink_size, settings.recent_size)
            ids = torch.tensor([s.ids], device=model.device)
            pos = torch.tensor(list(s.answer_positions), device=model.device)
            with torch.no_grad():  # the plain model's final hidden states: the target
                target = model.base_model(input_ids=ids).last_hidden_state[0, pos].float()  # [n_answer, hidden]
            with torch.enable_grad(), gated(model, gates, settings.sink_size, settings.recent_size):  # even if the
                hidden = model.base_model(input_ids=ids).last_hidden_state[0, pos].float()  # caller disabled grad
                distill = (hidden - target).pow(2).mean(dim=-1).mean()  # upstream: mean over hidden, over labels
                l1 = gates.abs().mean()  # upstream's l1_loss (duo_attn/loss.py)
                loss = distill + settings.reg * l1
                opt.zero_grad(set_to_none=True)
                loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            step += 1
            seconds += time.perf_counter() - t0
            history.append({"step": step, "distill": round(distill.item(), 6), "l1": round(l1.item(), 4),
                            "tokens": len(s.ids)})
            bar.set_postfix(distill=f"{distill.item():.4f}", mean_gate=f"{l1.item():.3f}")
            bar.update(1)
            if time.perf_counter() - last_save > SAVE_EVERY_S or step == settings.steps:
                save()
                last_save = time.perf_counter()
    bar.close()
    return {"gates": gates.detach().clone(), "seconds": seconds, "history": history}


# ---- method 2: retrieval score ---------------------------------------------------------------------------
def retrieval_scores(model, tokenizer, settings: Settings, checkpoint: Path | None, quiet: bool = False) -> dict:
    """Retrieval score per KV head (see the module docstring), over `settings.steps` needle prompts.

    One teacher-forced forward per prompt: the answer is appended, and the copy steps are the answer positions
    where the model's own greedy prediction is the next key digit (exactly the steps at which greedy generation
    would be copying the needle). A query head hits at such a step when its most attended key lies in the key
    sentence and is that same digit token. Returns {"gates" (max over query heads), "query_scores", ...}."""
    n_layers, n_kv = model_heads(model)
    n_q = model.config.num_attention_heads
    hits = torch.zeros(n_layers, n_q)  # summed per-prompt scores (hits / needle length)
    state = _load_checkpoint(checkpoint, settings) if checkpoint else None
    step, seconds, history = 0, 0.0, []
    if state:
        hits, step, seconds, history = state["hits"], state["step"], state["seconds"], state["history"]
    bar = _progress(settings.steps, step, "duo identify (retrieval)", quiet)
    last_save = time.perf_counter()
    model.eval()
    while step < settings.steps:
        t0 = time.perf_counter()
        s = needle_sample(tokenizer, settings.context, settings.seed, step, settings.sink_size, settings.recent_size)
        positions = list(s.answer_positions)  # the last len(positions) query rows of the forward
        ids = torch.tensor([s.ids[:-1]], device=model.device)  # the last answer token predicts nothing we score
        with torch.no_grad(), recording_top_keys(model, len(positions)) as top:
            hidden = model.base_model(input_ids=ids).last_hidden_state[0, -len(positions):]
            predicted = model.get_output_embeddings()(hidden).argmax(dim=-1).tolist()  # the model's greedy next tokens
            top_keys = torch.stack([top[i][0] for i in range(n_layers)])  # [n_layers, n_q, rows]
        needle_tokens = [t for t in s.ids[s.prompt_len:] if _is_digit_token(tokenizer, t)]
        prompt_hits = torch.zeros(n_layers, n_q)
        copied = 0
        for row, p in enumerate(positions):
            target = s.ids[p + 1]
            if not _is_digit_token(tokenizer, target) or predicted[row] != target:
                continue  # not a step at which the model copies a needle digit
            copied += 1
            k = top_keys[:, :, row]  # [n_layers, n_q] attended positions
            in_needle = (k >= s.needle_start) & (k < s.needle_end)
            same_token = torch.tensor(s.ids)[k] == target
            prompt_hits += (in_needle & same_token).float()
        hits += prompt_hits / max(1, len(needle_tokens))
        step += 1
        seconds += time.perf_counter() - t0
        history.append({"step": step, "tokens": len(s.ids), "copied": copied, "needle": len(needle_tokens)})
        bar.update(1)
        if time.perf_counter() - last_save > SAVE_EVERY_S or step == settings.steps:
            if checkpoint:
                _save_checkpoint(checkpoint, {"settings": asdict(settings), "step": step, "seconds": seconds,
                                              "history": history, "hits": hits})
            last_save = time.perf_counter()
    bar.close()
    query_scores = hits / settings.steps  # [n_layers, n_q]
    per_kv = query_scores.view(n_layers, n_kv, n_q // n_kv).amax(dim=-1)  # [n_layers, n_kv]: max over its query heads
    return {"gates": per_kv, "query_scores": query_scores, "seconds": seconds, "history": history}


# ---- the whole run ---------------------------------------------------------------------------------------
def identify(model, tokenizer, out, method: str = "optimize", steps: int | None = None, context: int = DEFAULT_CONTEXT,
             seed: int = 0, sinks: int = DEFAULT_SINKS, recent: int = DEFAULT_RECENT, lr: float = DEFAULT_LR,
             reg: float = DEFAULT_REG, quiet: bool = False) -> dict:
    """Identify the heads of `model`, write the pattern to `out`, return its metadata (also in the file's header).
    Resumes from `<out>.partial.pt` when it holds a run with the same settings; deletes it when done."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    steps = DEFAULT_STEPS[method] if steps is None else steps
    for name, value, low in (("steps", steps, 1), ("context", context, 16), ("sinks", sinks, 0), ("recent", recent, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if context > getattr(model.config, "max_position_embeddings", context):
        raise ValueError(f"context {context} exceeds the model's {model.config.max_position_embeddings} positions")
    optimizing = method == "optimize"
    settings = Settings(method, str(getattr(model, "streamkv_name", type(model).__name__)), steps, context, seed,
                        sinks, recent, lr if optimizing else None, reg if optimizing else None)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint = _partial_path(out)
    torch.manual_seed(seed)
    run = optimize_gates if method == "optimize" else retrieval_scores
    result = run(model, tokenizer, settings, checkpoint, quiet)
    meta = {**asdict(settings), "seconds": round(result["seconds"], 1), "threads": torch.get_num_threads(),
            "gate_summary": _summary(result["gates"])}
    if method == "optimize":
        meta["final_distill"] = result["history"][-1]["distill"]
    save_pattern(out, result["gates"], meta)
    checkpoint.unlink(missing_ok=True)
    return {**meta, "gates": result["gates"], "history": result["history"]}


def _summary(gates: torch.Tensor) -> dict:
    g = gates.flatten()
    return {"min": round(g.min().item(), 4), "max": round(g.max().item(), 4), "mean": round(g.mean().item(), 4),
            "above_0.5": int((g > 0.5).sum()), "heads": g.numel()}


# ---- passkey check with some heads made streaming (the ablation) ---------------------------------------
@torch.no_grad()
def passkey_correct(model, tokenizer, sample: NeedleSample, gates: torch.Tensor, sinks: int, recent: int) -> bool:
    """Would greedy decoding answer this prompt's key with these gates? One teacher-forced forward: correct iff the
    model predicts each key digit where it comes and no digit after the last one (the passkey evaluator's rule:
    the first number in the answer equals the key)."""
    ids = torch.tensor([sample.ids[:-1]], device=model.device)  # prompt + " " + key digits (the "." is predicted)
    n = len(sample.ids) - sample.prompt_len  # answer tokens: " ", digits, "."
    with gated(model, gates, sinks, recent):
        hidden = model.base_model(input_ids=ids).last_hidden_state[0, -n:]
    predicted = model.get_output_embeddings()(hidden).argmax(dim=-1).tolist()
    expected = sample.ids[sample.prompt_len:]
    digits_ok = all(p == e for p, e in zip(predicted, expected) if _is_digit_token(tokenizer, e))
    return digits_ok and not _is_digit_token(tokenizer, predicted[-1])


# ---- command line -------------------------------------------------------------------------------------
IDENTIFY_DESCRIPTION = (
    "Find which KV heads of a model need the whole context (retrieval heads) and which can keep only attention "
    "sinks + a recent window (streaming heads), and write a DuoAttention pattern file (full_attention_heads.tsv "
    "format, one line per layer, one gate in [0, 1] per KV head). Runs on short synthetic passkey prompts. "
    "--method optimize (default) trains one gate per KV head as DuoAttention does (frozen model, distillation "
    "+ L1); --method retrieval measures the Retrieval Head copy score (Wu et al. 2024). Time with the "
    "embedded 135M model at --context 1024, --threads 1 on a 2-core Xeon: 8-11 s per optimisation step "
    "(default 120 steps: 16-22 min) or 2 s per retrieval prompt (default 40: ~1.5 min); time grows with model "
    "size and context. "
    "Interrupted runs resume from OUT.partial.pt. Afterwards pass the file to the duo cache policy: "
    "--policy duo:pattern=OUT,sparsity=0.5 (sparsity = fraction of heads that become streaming). "
    "The embedded model already ships a pattern (pattern=embedded)."
)


def register(sub) -> None:
    """`streamkv duo identify`: called by streamkv/cli.py."""
    from .cli import add_load_args

    duo = sub.add_parser("duo", help="DuoAttention tools: identify retrieval heads",
                         description="DuoAttention: retrieval heads keep the full cache, streaming heads a window.")
    duo_sub = duo.add_subparsers(dest="duo_command", metavar="SUBCOMMAND", required=True)
    p = duo_sub.add_parser("identify", help="find a model's retrieval heads and write a pattern file",
                           description=IDENTIFY_DESCRIPTION)
    p.add_argument("--out", required=True, help="pattern file to write (.tsv); its checkpoint is OUT.partial.pt")
    p.add_argument("--method", choices=METHODS, default="optimize",
                   help="optimize: DuoAttention gate training (default); retrieval: Retrieval Head copy score")
    p.add_argument("--model", default=None, help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"optimisation steps (default {DEFAULT_STEPS['optimize']}) or retrieval prompts "
                        f"(default {DEFAULT_STEPS['retrieval']}); one synthetic passkey prompt each")
    p.add_argument("--context", type=int, default=DEFAULT_CONTEXT,
                   help=f"longest prompt in tokens; prompts are drawn from [context/2, context] (default {DEFAULT_CONTEXT})")
    p.add_argument("--sinks", type=int, default=DEFAULT_SINKS,
                   help=f"sink tokens a streaming head keeps while identifying (default {DEFAULT_SINKS}, as DuoAttention)")
    p.add_argument("--recent", type=int, default=DEFAULT_RECENT,
                   help=f"recent tokens a streaming head keeps while identifying (default {DEFAULT_RECENT}, as DuoAttention)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts (default 0)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_load_args(p)
    p.set_defaults(func=cmd_identify)


def cmd_identify(args) -> int:
    from .models import load

    model, tok = load(args.model, threads=args.threads, dtype=args.dtype, quantize=args.quantize, device=args.device)
    meta = identify(model, tok, args.out, method=args.method, steps=args.steps, context=args.context, seed=args.seed,
                    sinks=args.sinks, recent=args.recent, quiet=args.quiet)
    summary = meta["gate_summary"]
    print(f"wrote {args.out}: {summary['heads']} KV heads, gates {summary['min']:.2f}..{summary['max']:.2f} "
          f"(mean {summary['mean']:.2f}), {meta['seconds']:.0f} s. Use it with --policy "
          f"duo:pattern={args.out},sparsity=0.5", file=sys.stderr)
    return 0


__all__ = ["DUO_TRAIN", "TOP_KEY", "NeedleSample", "Settings", "attention_masks", "gated", "identify",
           "needle_sample", "passkey_correct", "recording_top_keys", "register", "optimize_gates", "retrieval_scores"]
