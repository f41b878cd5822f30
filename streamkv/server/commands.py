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

from ..cli import add_load_args, load_kwargs

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
    from .config import DEFAULTS as D, MIB

    p = subparsers.add_parser(
        "serve", help="run the OpenAI-compatible server with persistent streaming sessions",
        description="OpenAI-compatible HTTP server (POST /v1/chat/completions, /v1/completions, GET /v1/models) "
                    "where a conversation can be an endless stream with a bounded KV cache: open one with "
                    "POST /v1/sessions and send only new turns with body field session_id (openai client: "
                    "extra_body={'session_id': id}) or header X-Session-Id. Sessions persist in --data-dir and "
                    "survive restarts and crashes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--model", default=D.model, help="Hugging Face id or local folder (default: the embedded "
                   "SmolLM2-135M-Instruct)")
    g.add_argument("--served-model-name", default=None, help="model id clients send and /v1/models lists "
                   "(default: 'embedded', or the folder name of --model)")
    add_load_args(g)  # --dtype, --quantize, --device: defined once, in cli.py
    g.add_argument("--threads", type=_positive, default=D.threads, help="torch threads for forwards (split between --workers; other server threads use one)")
    g.add_argument("--workers", type=_positive, default=D.workers,
                   help="generation worker threads; sessions interleave token by token on them")
    g.add_argument("--policy", default=D.policy,
                   help="default cache policy of new sessions and stateless requests (sink, window or recompute)")
    g.add_argument("--chunk-size", type=_positive, default=D.chunk_size, help="prefill chunk (tokens per forward)")
    n = p.add_argument_group("network and safety")
    n.add_argument("--host", default=D.host, help="bind address; anything but loopback requires an API key")
    n.add_argument("--port", type=int, default=D.port)
    n.add_argument("--api-key", action="append", default=None,
                   help="require 'Authorization: Bearer KEY' (repeatable: each key owns its own sessions). Visible "
                        "to other local users in `ps`: prefer env STREAMKV_API_KEY (comma-separated) or --api-key-file")
    n.add_argument("--api-key-file", default=os.environ.get("STREAMKV_API_KEY_FILE"),
                   help="file with one API key per line (env STREAMKV_API_KEY_FILE)")
    n.add_argument("--allowed-host", action="append", default=None,
                   help="Host header names the server answers to (repeatable; default: the loopback names when "
                        "bound to loopback, the bound address otherwise, any when bound to 0.0.0.0)")
    n.add_argument("--cors-origin", action="append", default=None,
                   help="allow browser pages from this origin (repeatable); default: no CORS at all")
    n.add_argument("--max-body-bytes", type=_positive, default=D.max_body_bytes, help="larger request bodies get 413")
    n.add_argument("--max-tokens-cap", type=_positive, default=D.max_tokens_cap,
                   help="largest max_tokens a request may ask for")
    n.add_argument("--default-max-tokens", type=_positive, default=D.default_max_tokens,
                   help="max_tokens when a request omits it")
    n.add_argument("--max-input-tokens", type=_positive, default=D.max_input_tokens,
                   help="largest new input per request")
    n.add_argument("--default-temperature", type=float, default=D.default_temperature,
                   help="temperature when a request omits it (0 = greedy, deterministic)")
    c = p.add_argument_group("what clients may choose")
    c.add_argument("--allowed-policies", default=",".join(D.allowed_policies),
                   help="cache policies clients may pick for their sessions (comma-separated; recompute costs a "
                        "full forward over its window per token; dense is never served)")
    c.add_argument("--max-window", type=_positive, default=D.max_window, help="largest window a client may pick")
    c.add_argument("--max-sinks", type=int, default=D.max_sinks, help="most attention sinks a client may pick")
    c.add_argument("--max-step-tokens", type=_positive, default=D.max_step_tokens,
                   help="most tokens one decode step may run through the model (recompute: window + 1)")
    c.add_argument("--duo-pattern", default=D.duo_pattern,
                   help="head pattern file for duo sessions (`streamkv duo identify` writes one; DuoAttention's "
                        "full_attention_heads.tsv works too); 'embedded' = the one shipped for the embedded model")
    s = p.add_argument_group("sessions, memory and disk")
    s.add_argument("--data-dir", default=default_data_dir(), help="SQLite database and snapshots (env STREAMKV_DATA)")
    s.add_argument("--max-resident-sessions", type=_positive, default=D.max_resident,
                   help="sessions kept in memory (incl. running stateless requests); idle ones beyond are "
                        "evicted LRU-first to disk, and 429 + Retry-After when all are busy")
    s.add_argument("--max-cache-mb", type=float, default=None,
                   help="memory budget of all resident sessions together, priced at their full window "
                        "(default: half the memory available at start-up)")
    s.add_argument("--max-session-mb", type=float, default=None,
                   help="memory one session may cost at its full window; larger policies get 400 "
                        "(default: --max-cache-mb / --max-resident-sessions)")
    s.add_argument("--max-queued-per-session", type=_positive, default=D.max_waiters,
                   help="requests that may wait for one session before 429")
    s.add_argument("--max-sessions-per-key", type=_positive, default=D.max_sessions_per_key,
                   help="sessions one API key may hold (403 beyond)")
    s.add_argument("--max-session-disk-mb", type=float, default=D.max_session_disk_bytes / MIB,
                   help="disk one session may use (snapshot + turn log + transcript); further turns get 403")
    s.add_argument("--max-disk-mb-per-key", type=float, default=None,
                   help="disk all sessions of one API key may use (default: half the free disk, at most 16 GiB)")
    s.add_argument("--max-metadata-bytes", type=_positive, default=D.max_metadata_bytes,
                   help="largest session metadata, as JSON")
    s.add_argument("--sse-keepalive", type=float, default=D.sse_keepalive,
                   help="seconds a stream may go without a token (e.g. during a long prefill) before the server "
                        "sends an SSE comment, so proxies do not drop it; 0: never")
    s.add_argument("--shutdown-timeout", type=float, default=D.shutdown_timeout,
                   help="seconds SIGTERM lets running turns finish (and commit); then they are rolled back")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=serve)
    return p


def read_keys(args) -> list[str]:
    """API keys from --api-key, env STREAMKV_API_KEY (comma-separated) and --api-key-file (one per line)."""
    keys = list(args.api_key or [])
    keys += [k.strip() for k in os.environ.get("STREAMKV_API_KEY", "").split(",") if k.strip()]
    if args.api_key_file:
        keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
    return keys


def config_from_args(args):
    from .config import MIB, ServerConfig

    def mb(value):
        return None if value is None else int(value * MIB)

    if args.served_model_name:
        name = args.served_model_name
    elif args.model in (None, "", "embedded"):
        name = "embedded"
    else:
        name = Path(args.model.rstrip("/")).name or args.model
    return ServerConfig(
        model=args.model, model_name=name, **load_kwargs(args), threads=args.threads, data_dir=args.data_dir,
        host=args.host, port=args.port, api_keys=read_keys(args), allowed_hosts=list(args.allowed_host or []),
        cors_origins=list(args.cors_origin or []), policy=args.policy, max_resident=args.max_resident_sessions,
        max_cache_bytes=mb(args.max_cache_mb), max_session_bytes=mb(args.max_session_mb),
        max_waiters=args.max_queued_per_session, max_body_bytes=args.max_body_bytes,
        max_tokens_cap=args.max_tokens_cap, default_max_tokens=args.default_max_tokens,
        max_input_tokens=args.max_input_tokens, default_temperature=args.default_temperature, workers=args.workers,
        chunk_size=args.chunk_size, shutdown_timeout=args.shutdown_timeout, sse_keepalive=args.sse_keepalive,
        allowed_policies=tuple(x.strip() for x in args.allowed_policies.split(",") if x.strip()),
        max_window=args.max_window, max_sinks=args.max_sinks, max_step_tokens=args.max_step_tokens,
        duo_pattern=args.duo_pattern,
        max_sessions_per_key=args.max_sessions_per_key, max_session_disk_bytes=mb(args.max_session_disk_mb),
        max_disk_bytes_per_key=mb(args.max_disk_mb_per_key), max_metadata_bytes=args.max_metadata_bytes)


def serve(args) -> int:
    setup_logging(args.log_level)
    log = logging.getLogger("streamkv.server")
    os.umask(0o077)  # the database, snapshots and logs hold every transcript: private to this user
    try:
        cfg = config_from_args(args)
    except OSError as e:
        print(f"error: --api-key-file: {e}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and not cfg.api_keys:
        print(f"error: refusing to bind {args.host} without an API key: set STREAMKV_API_KEY, pass --api-key-file "
              "or --api-key (or bind 127.0.0.1)", file=sys.stderr)
        return 2
    if args.api_key:
        log.warning("--api-key is visible to other local users in `ps`; prefer STREAMKV_API_KEY or --api-key-file")
    if cfg.default_max_tokens > cfg.max_tokens_cap:
        cfg.default_max_tokens = cfg.max_tokens_cap
    import uvicorn

    from ..models import UnsupportedModelError
    from .app import Guard, compute_threads, create_app
    from .errors import BadRequest
    from .sessions import parse_policy
    from .store import StoreError

    try:
        parse_policy(cfg.policy, None)
    except BadRequest as e:
        print(f"error: --policy: {e.message}", file=sys.stderr)
        return 2
    Path(cfg.data_dir).mkdir(parents=True, exist_ok=True, mode=0o700)
    import torch

    torch.set_num_threads(compute_threads(cfg.workers, cfg.threads)[1])  # forwards run on the compute pool (app.pools)
    log.info("loading model", extra={"model": cfg.model or "embedded"})
    try:
        app = create_app(cfg)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BadRequest as e:
        print(f"error: the server's own settings do not fit together: {e.message}", file=sys.stderr)
        return 2
    except (FileNotFoundError, UnsupportedModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            app.state.on_signal()  # running turns: finish within --shutdown-timeout or roll back
            super().handle_exit(sig, frame)

    config = uvicorn.Config(Guard(app, cfg), host=args.host, port=args.port, log_config=None,
                            access_log=False, timeout_graceful_shutdown=int(cfg.shutdown_timeout) + 5,
                            lifespan="on", server_header=False)
    server = Server(config)
    log.info("listening", extra={"url": f"http://{args.host}:{args.port}", "auth": bool(cfg.api_keys)})
    # uvicorn handles SIGINT/SIGTERM (stop accepting, finish running requests, lifespan shutdown, which
    # flushes sessions) and then re-raises the signal with the handler that was installed before: make that
    # one a no-op so a clean shutdown exits 0 instead of dying by the signal.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: None)
    server.run()
    return 0 if server.started else 1
