"""Helpers for the server tests: a tiny random Llama with the embedded tokenizer, and a real `streamkv serve`
process on a free loopback port (always killed in teardown)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny"  # served model name of the tiny model


def build_tiny_model(folder: Path) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import streamkv.models

    tok = AutoTokenizer.from_pretrained(streamkv.models.resolve(None))  # has a chat template
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("models") / TINY)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m streamkv.server serve ...` as a child process."""

    def __init__(self, model: Path | None, data_dir: Path, *extra: str, env: dict | None = None,
                 log: Path | None = None):
        self.model, self.data_dir, self.extra = model, Path(data_dir), list(extra)
        self.env = {**os.environ, **(env or {})}
        self.log_path = log or self.data_dir.parent / f"{self.data_dir.name}-server.log"
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "streamkv.server", "serve", "--port", str(self.port), "--data-dir",
               str(self.data_dir), "--threads", "1", "--log-level", "info"]
        if self.model is not None:
            cmd += ["--model", str(self.model), "--served-model-name", TINY]
        return cmd + self.extra

    def start(self, timeout: float = 120) -> "Server":
        self.port = free_port()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """kill -9: no shutdown hook runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode if self.proc else 0

    def stop(self) -> None:
        try:
            self.terminate(30)
        except Exception:
            self.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def client(self, api_key: str = "none", **kw):
        from openai import OpenAI
        return OpenAI(base_url=self.base_url + "/v1", api_key=api_key, max_retries=0, timeout=120, **kw)

    def http(self, api_key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=120)


def create_session(http: httpx.Client, **body) -> str:
    r = http.post("/v1/sessions", json=body)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def state(http: httpx.Client, sid: str, full: bool = False) -> dict:
    r = http.get(f"/v1/sessions/{sid}/state", params={"logits": "full" if full else "none"})
    assert r.status_code == 200, r.text
    return r.json()


def say(client, sid: str, text: str, max_tokens: int = 8) -> str:
    out = client.chat.completions.create(model=TINY, messages=[{"role": "user", "content": text}],
                                         max_tokens=max_tokens, temperature=0, extra_body={"session_id": sid})
    return out.choices[0].message.content
