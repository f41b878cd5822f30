"""The `streamkv` command line: chat, generate, info, demo (+ eval, bench and serve when installed)."""
from __future__ import annotations

import argparse
import sys
import time

POLICY_HELP = ("cache policy, optionally with parameters (e.g. 'memory:topk=8,block=64'): sink (StreamingLLM, default), "
               "memory (sink + window + evicted blocks retrieved from a RAM/disk store: remembers far back), window, "
               "dense (keep all), recompute (slow reference)")


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def add_load_args(p) -> None:
    """--dtype, --quantize, --compile and --device: how the weights are loaded and run. The one definition of these flags (every
    command that loads a model calls this; `load_kwargs` turns them into `models.load` arguments)."""
    from .models import DEFAULT_DEVICE, DEFAULT_DTYPE, DTYPES
    from .quantize import QUANTIZE_MODES

    p.add_argument("--dtype", default=DEFAULT_DTYPE, choices=DTYPES, help=f"weights dtype (default: {DEFAULT_DTYPE})")
    p.add_argument("--quantize", default=QUANTIZE_MODES[0], choices=QUANTIZE_MODES,
                   help="weight-only quantisation of the linear layers after loading, CPU only: int8 per channel, "
                        "int4 in groups of 32 (output head int8); faster decoding, see docs/RESULTS.md (default: none)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step with torch.compile (sink, window, h2o and sirllm once their "
                        "cache is full, and memory's steps between two choices of blocks; duo stays eager). The first such "
                        "step compiles (C++ included): on a slow 2-core Xeon ~130 s for sink, ~6 min for h2o the first "
                        "time on a machine, ~13 s once inductor's disk cache holds it; then each step is faster. Falls "
                        "back to eager with a warning")
    p.add_argument("--device", default=DEFAULT_DEVICE,
                   help=f"torch device: cpu, cuda or cuda:N (default: {DEFAULT_DEVICE}; an error if CUDA is absent)")


def load_kwargs(args) -> dict:
    """The `models.load` keyword arguments for the flags `add_load_args` defined."""
    return {"dtype": args.dtype, "quantize": args.quantize, "device": args.device, "compile": args.compile}


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for PyTorch (default: 2)")
    add_load_args(p)


def add_policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--policy", default="sink", help=POLICY_HELP)
    p.add_argument("--sinks", type=int, default=None, help="attention sinks kept by `sink` (default 4)")
    p.add_argument("--window", type=int, default=None, help="recent tokens kept (default 1020 for sink, 768 for memory, 1024 for window/recompute)")
    p.add_argument("--store-dir", default=None, help="memory: directory for evicted blocks on disk (default: a temporary one, deleted at exit)")
    p.add_argument("--chunk-size", type=int, default=512, help="tokens per forward when feeding long input (default 512)")


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens to generate (default {max_new_tokens}; any length, the cache stays bounded)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); >0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (default 0 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def policy_from_args(args, model):
    from .policies import POLICIES, make_policy, parse_policy_spec, policy_params

    name, params = parse_policy_spec(args.policy)
    if name not in POLICIES:
        raise ValueError(f"unknown --policy {name!r}; choose one of: {', '.join(POLICIES)}")
    accepted = policy_params(name)
    for flag in ("sinks", "window", "store_dir"):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag not in accepted:
            raise ValueError(f"--{flag.replace('_', '-')} does not apply to policy {name!r} (it takes: {', '.join(accepted) or 'nothing'})")
        params[flag] = value
    return make_policy(name, model, **params)


def load_session(args):
    from .models import load
    from .session import StreamSession

    t0 = time.perf_counter()
    model, tokenizer = load(args.model, threads=args.threads, **load_kwargs(args))
    policy = policy_from_args(args, model)
    session = StreamSession(model, tokenizer, policy, chunk_size=args.chunk_size)
    return session, time.perf_counter() - t0


def sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop=args.stop)


def status_line(session) -> str:
    s = session.stats()
    memory = (f" | store {s['blocks']:,} blocks: {s['ram_bytes'] / 2**20:.0f} MiB RAM, {s['disk_bytes'] / 2**20:.0f} MiB disk"
              if "blocks" in s else "")
    return (f"[{s['policy']} | seen {s['tokens_seen']:,} tok | cached {s['tokens_cached']:,} tok | "
            f"KV {s['cache_bytes'] / 2**20:.1f} MiB{memory} | RSS {_rss_mb():.0f} MiB]")


# ---- commands ----------------------------------------------------------------------------------------
def cmd_chat(args) -> int:
    session, secs = load_session(args)
    interactive = sys.stdin.isatty()
    print(f"streamkv chat: {session.model.streamkv_name}, loaded in {secs:.1f}s. "
          "Endless: the cache stays bounded however long you talk. /stats, /quit.", file=sys.stderr)
    if args.system:
        session.messages.append({"role": "system", "content": args.system})
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            break
        if line == "/stats":
            print(status_line(session), file=sys.stderr)
            continue
        print("bot> ", end="", flush=True)
        t0 = time.perf_counter()
        for piece in session.chat(line, **sampling_kwargs(args)):
            print(piece, end="", flush=True)
        dt = time.perf_counter() - t0
        print()
        print(f"{status_line(session)} {dt:.1f}s", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("give --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        with open(args.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    elif args.prompt is not None:
        prompt = args.prompt
    elif not sys.stdin.isatty():
        prompt = sys.stdin.read()
    else:
        raise ValueError("no prompt: pass --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    if not prompt.strip():
        raise ValueError("the prompt is empty")
    session, secs = load_session(args)
    if args.chat:
        pieces = session.chat(prompt, **sampling_kwargs(args))
    else:
        session.feed(prompt)
        pieces = session.generate(**sampling_kwargs(args))
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    print(f"{status_line(session)} finish={session.last_finish_reason} load={secs:.1f}s", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    from .models import kv_bytes_per_token, resolve
    from .rope import describe_rope, rope_for, text_config

    session, secs = load_session(args)
    model, cfg = session.model, text_config(session.model.config)
    rope = rope_for(model)
    kv_heads = getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    head_dim = rope.head_dim
    bytes_per_token = kv_bytes_per_token(model)
    budget = getattr(session.policy, "max_resident", getattr(session.policy, "budget", None))  # memory: + fetched blocks
    rows = [
        ("model", f"{session.model.streamkv_name} ({resolve(args.model)})"),
        ("architecture", f"{cfg.model_type}: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query / {kv_heads} KV heads, head_dim {head_dim}"),
        ("parameters", f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M ({model.dtype}) on {model.device}"),
        ("quantize", _quantize_row(model)),
        ("trained context", f"{getattr(cfg, 'max_position_embeddings', '?')} tokens"),
        ("rotary", f"{describe_rope(model)} (verified by probe)"),
        ("policy", ", ".join(f"{k}={v}" for k, v in session.policy.describe().items())),
        ("KV per token", f"{bytes_per_token / 1024:.1f} KiB"),
        ("KV cache bound", "none (grows with the stream)" if budget is None or session.policy.name == "dense"
         else f"{(budget + 1) * bytes_per_token / 2**20:.1f} MiB for {budget} attended tokens (+ the chunk being fed)"),
        *([("memory store", f"evicted KV in RAM up to {session.policy.ram_mb} MiB, then on disk "
                            f"({bytes_per_token * session.policy.stored_fraction / 1024:.1f} KiB "
                            f"per evicted token) in {session.policy.store.directory}; index "
                            f"{session.policy.index_bytes_per_token():.0f} B per token stays in RAM")]
          if hasattr(session.policy, "store") else []),
        ("load time", f"{secs:.2f} s"),
        ("process RSS", f"{_rss_mb():.0f} MiB"),
        ("threads", str(torch.get_num_threads())),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    return 0


def _quantize_row(model) -> str:
    q = getattr(model, "streamkv_quantization", None) or {"mode": "none"}
    if q["mode"] == "none":
        return "none"
    group = f", groups of {q['group_size']}" if q["group_size"] else ""
    return (f"{q['mode']}{group}: {q['layers']} linear layers, {q['weight_bytes'] / 2**20:.0f} MiB"
            + (f", output head {q['head']}" if q["head"] else "")
            + (f", int8 fallback for {len(q['fallback_int8'])}" if q["fallback_int8"] else ""))


def demo_text(n_tokens_hint: int) -> str:
    """A long, varied, deterministic text (no data files needed): numbered log entries."""
    import random

    rng = random.Random(0)
    places = ["north gate", "river mill", "old bridge", "harbour", "east tower", "market square", "lighthouse"]
    lines = []
    for i in range(1, n_tokens_hint // 18 + 2):
        lines.append(f"Entry {i}: the keeper at the {rng.choice(places)} counted {rng.randint(2, 99)} boats "
                     f"and noted the weather as {rng.choice(['calm', 'windy', 'rainy', 'foggy', 'clear'])}.")
    return "\n".join(lines)


DEMO_FACT = "Remember this: the secret code of the vault is {code}. The secret code of the vault is {code}."
DEMO_QUESTION = "\nQuestion: what is the secret code of the vault? Answer: the secret code of the vault is"


def cmd_demo(args) -> int:
    """One fact at the start of a long stream, asked for at the end, through each policy in turn."""
    import gc
    import re

    from tqdm import tqdm

    from .models import kv_bytes_per_token, load
    from .policies import split_policy_list
    from .session import StreamSession

    t0 = time.perf_counter()
    model, tok = load(args.model, threads=args.threads, **load_kwargs(args))
    code = "48213"
    fact = tok(DEMO_FACT.format(code=code) + "\n", add_special_tokens=False).input_ids
    ids = fact + tok(demo_text(args.tokens), add_special_tokens=False).input_ids[: max(0, args.tokens - len(fact))]
    question = tok(DEMO_QUESTION, add_special_tokens=False).input_ids
    per_token = kv_bytes_per_token(model)
    print(f"Loaded {model.streamkv_name} in {time.perf_counter() - t0:.1f}s (trained context "
          f"{model.config.max_position_embeddings:,} tokens). The stream: one fact, \"{DEMO_FACT.format(code=code)}\", then "
          f"{len(ids) - len(fact):,} tokens of log entries, then the question. A dense cache would need "
          f"{per_token * len(ids) / 2**20:,.0f} MiB of KV for it.\n", flush=True)
    summary = []
    for spec in split_policy_list(args.policy):
        args.policy = spec
        session = StreamSession(model, tok, policy_from_args(args, model), chunk_size=args.chunk_size)
        print(f"policy {session.policy.describe()}")
        print(f"{'tokens seen':>12} {'attended':>9} {'KV MiB':>8} {'store RAM':>10} {'store disk':>11} {'RSS MiB':>8} {'tok/s':>7}")
        start_t = time.perf_counter()
        with tqdm(total=len(ids), unit="tok", file=sys.stderr, leave=False, disable=not sys.stderr.isatty()) as bar:
            for start in range(0, len(ids), args.report_every):
                t1 = time.perf_counter()
                piece = ids[start : start + args.report_every]
                session.feed(piece)
                bar.update(len(piece))
                st = session.stats()
                resident = st.get("resident_tokens", st["tokens_cached"])
                ram = f"{st['ram_bytes'] / 2**20:.0f} MiB" if "ram_bytes" in st else "-"
                disk = f"{st['disk_bytes'] / 2**20:.0f} MiB" if "disk_bytes" in st else "-"
                tqdm.write(f"{st['tokens_seen']:>12,} {resident:>9,} {st['cache_bytes'] / 2**20:>8.1f} {ram:>10} {disk:>11} "
                           f"{_rss_mb():>8.0f} {len(piece) / (time.perf_counter() - t1):>7.0f}")
        session.feed(question)
        reply = "".join(session.generate(max_new_tokens=args.max_new_tokens, stop=["\n"]))
        found = re.search(r"\d+", reply)
        ok = bool(found and found.group(0) == code)
        print(f"Q: what is the secret code of the vault?  ({len(ids):,} tokens after the fact)\n"
              f"A: {reply.strip()!r}  -> {'remembered' if ok else 'forgotten'}  [{time.perf_counter() - start_t:.0f}s]\n", flush=True)
        st = session.stats()
        summary.append((session.policy.name, ok, st["cache_bytes"], st.get("disk_bytes", 0), _rss_mb()))
        del session
        gc.collect()
    print(f"{'policy':<10} {'fact':<11} {'KV MiB':>8} {'store disk MiB':>15} {'RSS MiB':>8}")
    for name, ok, kv, disk, rss in summary:
        print(f"{name:<10} {'remembered' if ok else 'forgotten':<11} {kv / 2**20:>8.1f} {disk / 2**20:>15.0f} {rss:>8.0f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamkv",
        description="Run pretrained transformer LMs over unbounded token streams in constant memory "
                    "(StreamingLLM attention sinks and other KV-cache policies). Offline by default: the embedded "
                    "SmolLM2-135M-Instruct model is used unless --model is given.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("chat", help="endless interactive chat in the terminal",
                       description="Chat with the model; every turn is appended to one endless stream whose KV cache stays bounded. "
                                   "Type /stats for cache usage, /quit to leave. Reads stdin line by line when piped.")
    add_model_args(p); add_policy_args(p); add_sampling_args(p, 256)
    p.add_argument("--system", default=None, help="system prompt for the conversation")
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="continue a prompt, any length",
                       description="Feed a prompt (any length: it is fed in chunks with eviction) and stream the continuation to stdout.")
    add_model_args(p); add_policy_args(p); add_sampling_args(p, 256)
    p.add_argument("--prompt", default=None, help="prompt text (or use --prompt-file, or stdin)")
    p.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the chat template")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("info", help="model, policy and memory figures",
                       description="Load the model and print its architecture, the cache policy, KV bytes per token and the cache bound.")
    add_model_args(p); add_policy_args(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("demo", help="stream far past the model's context: sink forgets an early fact, memory recalls it",
                       description="Plant one fact, then stream a long generated text (default 20,000 tokens, well past SmolLM2's "
                                   "8,192), then ask for the fact, once per policy (default: sink, then memory). Prints tokens seen, "
                                   "tokens attended, KV bytes, the memory store's RAM/disk and process RSS as it goes.")
    add_model_args(p); add_policy_args(p)
    p.set_defaults(policy="sink,memory")
    p.add_argument("--tokens", type=int, default=20000, help="tokens to stream (default 20000)")
    p.add_argument("--report-every", type=int, default=2048, help="print a line every N tokens (default 2048)")
    p.add_argument("--max-new-tokens", type=int, default=8, help="answer length at the end (default 8)")
    p.set_defaults(func=cmd_demo)

    for module in ("streamkv.evaluation.commands", "streamkv.server.commands", "streamkv.identify"):  # identify: `duo identify`
        try:
            mod = __import__(module, fromlist=["register"])
        except ImportError as e:
            if e.name and e.name.startswith(module.rsplit(".", 1)[0]):
                continue  # that part is not installed in this checkout
            raise
        mod.register(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    for name in ("threads", "chunk_size", "max_new_tokens", "tokens", "report_every", "window", "sinks"):
        value = getattr(args, name, None)
        if value is not None and value < (0 if name == "sinks" else 1):
            parser.error(f"--{name.replace('_', '-')} must be {'>= 0' if name == 'sinks' else 'a positive integer'}, got {value}")
    from .rope import UnsupportedModelError

    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, UnsupportedModelError) as e:
        print(f"streamkv {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
