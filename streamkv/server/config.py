"""The server's configuration: every default lives here, once. The `serve` command's flags take their
defaults from `DEFAULTS`, and budgets left unset (None) are derived from the machine at start-up by
`admission.resolve_budgets`, so a default install is safe on any machine."""
from __future__ import annotations

from dataclasses import dataclass, field

from ..models import DEFAULT_DEVICE, DEFAULT_DTYPE
from ..quantize import QUANTIZE_MODES

MIB = 1 << 20


@dataclass
class ServerConfig:
    # model
    model: str | None = None
    model_name: str = "embedded"  # the id clients pass as `model` and /v1/models lists
    dtype: str = DEFAULT_DTYPE
    quantize: str = QUANTIZE_MODES[0]  # weight-only int8/int4 of the linears (see streamkv/quantize.py)
    compile: bool = False  # torch.compile the one-token decode step of sink/window/memory sessions (streamkv/compiled.py)
    device: str = DEFAULT_DEVICE
    threads: int = 2
    workers: int = 1  # compute threads (forwards); each runs one session's step at a time
    io_threads: int = 2  # snapshot reads/writes and the database
    chunk_size: int = 512
    policy: str = "sink:sinks=4,window=1020"  # of new sessions and stateless requests
    # network
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)  # empty: derived from `host` (see guard.allowed_hosts)
    cors_origins: list[str] = field(default_factory=list)  # empty: no CORS headers at all
    # per request
    max_body_bytes: int = 1 * MIB
    max_tokens_cap: int = 4096
    default_max_tokens: int = 256
    max_input_tokens: int = 32768
    sse_keepalive: float = 15.0  # seconds without a token (a long prefill) before a stream gets an SSE comment
    default_temperature: float = 0.0
    min_temperature: float = 1e-3  # below it (but above 0) sampling overflows; 0 means greedy
    # what clients may choose for their sessions
    allowed_policies: tuple[str, ...] = ("sink", "window", "memory", "h2o", "sirllm", "duo")  # `recompute` costs a full forward per token
    max_window: int = 65536  # range of the window parameter (the byte budgets below usually bind first)
    max_sinks: int = 64
    max_step_tokens: int = 256  # compute: tokens one decode step may run through the model (recompute: window+1)
    duo_pattern: str = "embedded"  # the head pattern duo sessions use (clients cannot pick a file on the server)
    # memory (None = derived from the machine's memory at start-up)
    data_dir: str = "streamkv-data"
    max_resident: int = 16
    max_cache_bytes: int | None = None  # all resident sessions together; default: half the available RAM
    max_session_bytes: int | None = None  # one session; default: max_cache_bytes / max_resident
    max_waiters: int = 8
    # disk and quotas
    max_sessions_per_key: int = 1000
    max_session_disk_bytes: int = 256 * MIB  # snapshot + turn log + transcript (+ memory store) of one session
    max_disk_bytes_per_key: int | None = None  # default: min(16 GiB, half the free disk)
    max_metadata_bytes: int = 4096  # a session's metadata, as JSON
    # shutdown
    shutdown_timeout: float = 5.0  # running turns may finish this long after SIGTERM, then they roll back


DEFAULTS = ServerConfig()
