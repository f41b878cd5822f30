"""Shared helpers of the evaluation suite: policy lists, model loading, machine info, JSON output.

Policies are named exactly as everywhere else in streamkv (`parse_policy_spec`), so a policy added to
`streamkv.policies.POLICIES` is immediately usable by every command here: `--policy mynew:param=3`.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..policies import check_policy_name, make_policy, parse_policy_spec, policy_params, split_policy_list  # noqa: F401 (re-exported)


class EvalError(ValueError):
    """A bad argument or input: reported as one line, exit code 2."""


@dataclass
class PolicySpec:
    """One policy to evaluate: registry name + parameters, and a label used in JSON and plots."""

    name: str
    params: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.params:
            return self.name
        return self.name + ":" + ",".join(f"{k}={v}" for k, v in self.params.items())

    def build(self, model):
        return make_policy(self.name, model, **self.params)

    def resolved_params(self) -> dict:
        """Parameters including the defaults not given (for the record)."""
        return {**{k: v for k, v in policy_params(self.name).items()}, **self.params}


def parse_policies(values: list[str] | str | None, default: str = "sink") -> list[PolicySpec]:
    """Parse one or more --policy values (each may list several policies) and check names/parameters."""
    if values is None:
        values = [default]
    if isinstance(values, str):
        values = [values]
    out: list[PolicySpec] = []
    for value in values:
        try:
            specs = split_policy_list(value)
        except ValueError as e:
            raise EvalError(str(e)) from None
        for spec in specs:
            try:
                name, params = parse_policy_spec(spec)
                check_policy_name(name, params)
            except ValueError as e:
                raise EvalError(str(e)) from None
            bad = {k: v for k, v in params.items() if isinstance(v, int) and v < 0}
            if bad:
                raise EvalError(f"policy parameters must be non-negative: {bad}")
            p = PolicySpec(name, params)
            if any(o.label == p.label for o in out):
                raise EvalError(f"policy {p.label!r} is listed twice")
            out.append(p)
    if not out:
        raise EvalError("no policy given")
    return out


def policy_window(policy) -> int | None:
    """Tokens a policy attends besides the new ones, at most (None = unbounded): kept + retrieved for memory."""
    return getattr(policy, "max_resident", getattr(policy, "budget", None))


def load_model(args):
    """Load the model named by --model/--threads and the load flags (a one-line error on failure)."""
    from ..cli import load_kwargs
    from ..models import load

    try:
        return load(args.model, threads=args.threads, **load_kwargs(args))
    except (FileNotFoundError, ValueError) as e:
        raise EvalError(f"cannot load model: {e}") from None


def cpu_model() -> tuple[str, list[str]]:
    """The CPU's model name and its vector-extension flags (avx*, amx*, fma, f16c): what every figure records."""
    cpu, flags = "", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not cpu:
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = [f for f in line.split(":", 1)[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))]
    except OSError:
        pass
    return cpu or platform.processor() or platform.machine(), flags


def machine_info(threads: int | None = None) -> dict:
    cpu, flags = cpu_model()
    import transformers

    info = {
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "requested_threads": threads,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        import psutil

        info["ram_bytes"] = psutil.virtual_memory().total
    except Exception:  # pragma: no cover
        pass
    return info


def header(command: str, args, model=None) -> dict:
    """The common first keys of every result JSON: what was run, on what, when."""
    from .. import __version__

    h = {
        "command": command,
        "argv": sys.argv[1:],
        "streamkv": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": getattr(model, "streamkv_name", getattr(args, "model", None)) if model is not None else getattr(args, "model", None),
        "dtype": getattr(args, "dtype", None),
        "quantize": getattr(model, "streamkv_quantization", None) if model is not None else getattr(args, "quantize", None),
        "device": str(model.device) if model is not None else getattr(args, "device", None),
        "machine": machine_info(getattr(args, "threads", None)),
    }
    return h


def write_json(path: str | Path, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_jsonable) + "\n")
    os.replace(tmp, path)
    return path


def _jsonable(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o)}")


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0


def read_text_file(path: str) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise EvalError(f"cannot read {path}: {e.strerror or e}") from None
    if not text.strip():
        raise EvalError(f"{path} is empty")
    return text
