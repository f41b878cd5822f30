"""The streaming runtime: one endless token stream through a model, with a bounded cache.

    session = StreamSession(model, tokenizer, policy="sink", sinks=4, window=1020)
    session.feed(open("book.txt").read())            # any length: fed in chunks, evicting between them
    for piece in session.generate(max_new_tokens=200):
        print(piece, end="")
    for piece in session.chat("Summarise that."):      # chat turns append to the same stream
        print(piece, end="")
    session.stats()                                   # tokens seen / cached, cache bytes
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from .policies import Recompute, StreamingCache, make_policy
from .sampling import Sampler, SamplingParams


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end of turn or a stop string) or "length"


class StreamSession:
    def __init__(self, model, tokenizer=None, policy: str | StreamingCache | Recompute = "sink", *,
                 chunk_size: int = 512, **policy_params):
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
        self.model, self.tokenizer, self.chunk_size = model, tokenizer, chunk_size
        self.policy = make_policy(policy, model, **policy_params) if isinstance(policy, str) else policy
        self.logits: torch.Tensor | None = None  # next-token logits after the last fed token
        self.messages: list[dict] = []  # chat transcript
        self._chat_text = ""  # the chat-template text the stream holds so far
        self.last_finish_reason: str | None = None

    # ---- input -----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this session has no tokenizer: feed token ids instead of text")
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _ids(self, data) -> torch.Tensor:
        if isinstance(data, str):
            ids = self.encode(data) if data else []
        elif torch.is_tensor(data):
            ids = data.reshape(-1).tolist()
        else:
            ids = list(data)
        if not ids:
            raise ValueError("empty input: nothing to feed")
        vocab = self.model.config.vocab_size
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
        return torch.tensor(ids, dtype=torch.long)

    @torch.inference_mode()
    def feed(self, data: str | Sequence[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append text or token ids to the stream, `chunk_size` tokens per forward (the cache is trimmed
        to its budget after each chunk, so any input length runs in bounded memory). Returns the logits
        of the last token [V], or of every fed token [n, V] with all_logits."""
        ids = self._ids(data)
        outs = []
        for start in range(0, ids.numel(), self.chunk_size):
            chunk = ids[start : start + self.chunk_size].unsqueeze(0).to(self.model.device)
            logits = self._forward(chunk, all_logits)
            if all_logits:
                outs.append(logits)
        self.logits = logits[-1]
        return torch.cat(outs) if all_logits else self.logits

    def _forward(self, chunk: torch.Tensor, all_logits: bool) -> torch.Tensor:
        if isinstance(self.policy, Recompute):
            return self.policy.forward(self.model, chunk, all_logits).float()
        out = self.model(
            input_ids=chunk,
            position_ids=self.policy.position_ids(chunk.shape[1]).to(chunk.device),
            past_key_values=self.policy,
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return out.logits[0].float()

    # ---- output ----------------------------------------------------------------------------------
    def _stop_ids(self) -> set[int]:
        ids = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        return ids

    def generate(self, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                 seed: int | None = None, stop: Sequence[str] = (), stop_on_eos: bool = True,
                 prompt: str | Sequence[int] | None = None) -> Iterator[str]:
        """Yield text pieces as tokens are sampled (greedy unless temperature > 0). Every sampled token is
        fed back into the stream, so generation can go on far beyond the model's trained context.
        `session.last_finish_reason` is "stop" or "length" afterwards."""
        for _token_id, piece in self.generate_tokens(max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                                                     seed=seed, stop=stop, stop_on_eos=stop_on_eos, prompt=prompt):
            if piece:
                yield piece

    def generate_tokens(self, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0,
                        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), stop_on_eos: bool = True,
                        prompt: str | Sequence[int] | None = None) -> Iterator[tuple[int, str]]:
        """Like generate, yielding (token_id, text_piece). A piece may be "" while a stop string could still
        be starting; held-back text is released when it turns out not to be one."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        stop = [s for s in stop if s]
        sampler = Sampler(SamplingParams(temperature, top_p, top_k, seed))
        if prompt is not None:
            self.feed(prompt)
        if self.logits is None:
            raise ValueError("nothing to continue: feed a prompt first")
        eos = self._stop_ids() if stop_on_eos else set()
        ids: list[int] = []
        prefix_off = read_off = 0  # incremental detokenisation (decode only the tail, not the whole text)
        text = ""  # decoded so far
        emitted = 0  # characters of `text` already yielded
        longest = max((len(s) for s in stop), default=0)
        self.last_finish_reason = "length"
        for _ in range(max_new_tokens):
            token = sampler(self.logits)
            self.feed([token])  # the stream always holds every generated token
            if token in eos:
                self.last_finish_reason = "stop"
                break
            ids.append(token)
            if self.tokenizer is not None:
                before = self.tokenizer.decode(ids[prefix_off:read_off], skip_special_tokens=True)
                after = self.tokenizer.decode(ids[prefix_off:], skip_special_tokens=True)
                if len(after) > len(before) and not after.endswith("\ufffd"):
                    text += after[len(before):]
                    prefix_off, read_off = read_off, len(ids)
            window_start = max(0, emitted - longest)
            hits = [i for i in (text.find(s, window_start) for s in stop) if i >= 0]
            if hits:
                yield token, text[emitted:min(hits)]
                self.last_finish_reason = "stop"
                return
            hold = 0  # keep back a tail that may be the start of a stop string
            for s in stop:
                hold = max([hold] + [k for k in range(1, len(s)) if text.endswith(s[:k])])
            safe = max(emitted, len(text) - hold)
            yield token, text[emitted:safe]
            emitted = safe
        if emitted < len(text):
            yield -1, text[emitted:]

    def complete(self, prompt=None, **kwargs) -> GenerationResult:
        ids, pieces = [], []
        for token, piece in self.generate_tokens(prompt=prompt, **kwargs):
            if token >= 0:
                ids.append(token)
            pieces.append(piece)
        return GenerationResult("".join(pieces), ids, self.last_finish_reason)

    # ---- chat ------------------------------------------------------------------------------------
    def _render(self, add_generation_prompt: bool) -> str:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat needs a tokenizer with a chat template (use feed/generate for plain text)")
        return self.tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _feed_template(self, target: str) -> None:
        """Feed what the chat template adds beyond what the stream already holds."""
        if target.startswith(self._chat_text):
            new = target[len(self._chat_text):]
        else:  # the template re-rendered history differently (e.g. stripped whitespace): append the tail
            common = 0
            while common < min(len(target), len(self._chat_text)) and target[common] == self._chat_text[common]:
                common += 1
            new = target[common:]
        if new:
            self.feed(new)
        self._chat_text = target

    def chat(self, message: str, **generate_kwargs) -> Iterator[str]:
        """One chat turn: the user message is appended to the stream with the chat template, the reply is
        streamed back, and the closing of the assistant turn is fed so the next turn continues cleanly."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("empty chat message")
        self.messages.append({"role": "user", "content": message})
        self._feed_template(self._render(add_generation_prompt=True))
        pieces = []
        for piece in self.generate(**generate_kwargs):
            pieces.append(piece)
            yield piece
        reply = "".join(pieces)
        self.messages.append({"role": "assistant", "content": reply})
        self._chat_text += reply
        if self.last_finish_reason == "stop" and self.tokenizer.eos_token:
            self._chat_text += self.tokenizer.eos_token  # already in the stream (fed as a token)
        self._feed_template(self._render(add_generation_prompt=False))

    # ---- introspection / persistence ---------------------------------------------------------------
    def stats(self) -> dict:
        p = self.policy
        return {
            **p.describe(),
            "tokens_seen": p.seen,
            "tokens_cached": p.n_kept,
            "cache_bytes": p.nbytes(),
            "next_position": getattr(p, "next_pos", None),
        }

    def state_dict(self) -> dict:
        return {"policy": self.policy.state_dict(), "logits": self.logits, "messages": list(self.messages),
                "chat_text": self._chat_text}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.logits = state["logits"]
        self.messages = list(state["messages"])
        self._chat_text = state["chat_text"]
