"""The `serve` subcommand (registered by streamkv.cli)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName", "color_message"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus whatever `extra=` carried."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for k, v in vars(record).items():
            if k not in _STANDARD and not k.startswith("_"):
                out[k] = v
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our middleware logs requests (with ids, timings)


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return n


def default_data_dir() -> str:
    return os.environ.get("STREAMKV_DATA", str(Path.home() / ".local" / "share" / "streamkv" / "server"))


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible server with persistent streaming sessions",
        description="OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions, GET /v1/models) "
                    "where a conversation can be an endless stream with a bounded KV cache: open one with "
                    "POST /v1/sessions and send only new turns with body field session_id (openai client: "
                    "extra_body={'session_id': id}) or header X-Session-Id. Sessions persist in --data-dir and "
                    "survive restarts and crashes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=None, help="Hugging Face id or local folder (default: the embedded SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="model id clients send and /v1/models lists "
                   "(default: 'embedded', or the folder name of --model)")
    g.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    g.add_argument("--threads", type=_positive, default=2, help="torch intra-op threads")
    g.add_argument("--workers", type=_positive, default=1,
                   help="generation worker threads; sessions interleave token by token on them")
    g.add_argument("--policy", default="sink:sinks=4,window=1020",
                   help="default cache policy of new sessions and stateless requests (sink, window or recompute)")
    g.add_argument("--chunk-size", type=_positive, default=512, help="prefill chunk (tokens per forward)")
    n = p.add_argument_group("network and safety")
    n.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback requires --api-key")
    n.add_argument("--port", type=int, default=8000)
    n.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeatable: each key owns its own sessions); "
                        "also env STREAMKV_API_KEY (comma-separated)")
    n.add_argument("--max-body-bytes", type=_positive, default=1 << 20, help="larger request bodies get 413")
    n.add_argument("--max-tokens-cap", type=_positive, default=4096, help="largest max_tokens a request may ask for")
    n.add_argument("--default-max-tokens", type=_positive, default=256, help="max_tokens when a request omits it")
    n.add_argument("--max-input-tokens", type=_positive, default=32768, help="largest new input per request")
    n.add_argument("--default-temperature", type=float, default=0.0,
                   help="temperature when a request omits it (0 = greedy, deterministic)")
    s = p.add_argument_group("sessions and memory")
    s.add_argument("--data-dir", default=default_data_dir(), help="SQLite database and snapshots (env STREAMKV_DATA)")
    s.add_argument("--max-resident-sessions", type=_positive, default=16,
                   help="sessions kept in memory (incl. running stateless requests); idle ones beyond are "
                        "evicted LRU-first to disk, and 429 + Retry-After when all are busy")
    s.add_argument("--max-cache-mb", type=float, default=None,
                   help="budget for resident sessions' cache memory (estimated at full window), in MiB")
    s.add_argument("--max-queued-per-session", type=_positive, default=8,
                   help="requests that may wait for one session before 429")
    s.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for running turns to finish (and commit)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)
    return p


def config_from_args(args):
    from .app import ServerConfig

    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("STREAMKV_API_KEY", "").split(",") if k.strip()]
    if args.served_model_name:
        name = args.served_model_name
    elif args.model in (None, "", "embedded"):
        name = "embedded"
    else:
        name = Path(args.model.rstrip("/")).name or args.model
    return ServerConfig(
        model=args.model, model_name=name, dtype=args.dtype, threads=args.threads, data_dir=args.data_dir,
        api_keys=keys, policy=args.policy, max_resident=args.max_resident_sessions,
        max_cache_bytes=int(args.max_cache_mb * (1 << 20)) if args.max_cache_mb else None,
        max_waiters=args.max_queued_per_session, max_body_bytes=args.max_body_bytes,
        max_tokens_cap=args.max_tokens_cap, default_max_tokens=args.default_max_tokens,
        max_input_tokens=args.max_input_tokens, default_temperature=args.default_temperature, workers=args.workers,
        chunk_size=args.chunk_size, shutdown_timeout=args.shutdown_timeout)


def serve(args) -> int:
    setup_logging(args.log_level)
    log = logging.getLogger("streamkv.server")
    cfg = config_from_args(args)
    if args.host not in LOOPBACK and not cfg.api_keys:
        print(f"error: refusing to bind {args.host} without an API key: pass --api-key or set STREAMKV_API_KEY "
              "(or bind 127.0.0.1)", file=sys.stderr)
        return 2
    if cfg.default_max_tokens > cfg.max_tokens_cap:
        cfg.default_max_tokens = cfg.max_tokens_cap
    import uvicorn

    from ..models import UnsupportedModelError
    from .app import BodyLimit, create_app
    from .sessions import BadRequest, parse_policy

    try:
        parse_policy(cfg.policy, None)
    except BadRequest as e:
        print(f"error: --policy: {e.message}", file=sys.stderr)
        return 2
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True)
    log.info("loading model", extra={"model": cfg.model or "embedded"})
    try:
        app = create_app(cfg)
    except (FileNotFoundError, UnsupportedModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    config = uvicorn.Config(BodyLimit(app, cfg.max_body_bytes), host=args.host, port=args.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=int(cfg.shutdown_timeout) or None,
                            lifespan="on", server_header=False)
    server = uvicorn.Server(config)
    log.info("listening", extra={"url": f"http://{args.host}:{args.port}", "auth": bool(cfg.api_keys)})
    # uvicorn handles SIGINT/SIGTERM (stop accepting, finish running requests, lifespan shutdown, which
    # flushes sessions) and then re-raises the signal with the handler that was installed before: make that
    # one a no-op so a clean shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
