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

from . import compiled
from .policies import Recompute, StreamingCache, make_policy
from .rope import text_config
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
        self.messages: list[dict] = []  # chat transcript (the template is rendered over its tail only)
        self._n_fed = 0  # how many of `messages` are in the stream (a caller may append a system prompt)
        self.last_finish_reason: str | None = None
        self.last_text = ""  # everything the last generation put into the stream (stop string included)
        self.last_eos = False  # whether it ended with an end-of-sequence token (also in the stream)
        self.last_usage = {"prompt_tokens": 0, "completion_tokens": 0}
        self._prompt_tokens = 0  # tokens fed since the last generation (the next one's prompt)

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
        vocab = text_config(self.model.config).vocab_size  # multimodal wrappers nest the decoder's config
        bad = [i for i in ids if not isinstance(i, int) or not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids must be integers in [0, {vocab}); got {bad[:5]}")
        return torch.tensor(ids, dtype=torch.long)

    def feed(self, data: str | Sequence[int] | torch.Tensor, all_logits: bool = False) -> torch.Tensor:
        """Append text or token ids to the stream, `chunk_size` tokens per forward (the cache is trimmed
        to its budget after each chunk, so any input length runs in bounded memory). Returns the logits
        of the last token [V], or of every fed token [n, V] with all_logits."""
        outs = list(self._chunks(self._ids(data), all_logits))
        return torch.cat(outs) if all_logits else self.logits

    def feed_iter(self, data: str | Sequence[int] | torch.Tensor) -> Iterator[int]:
        """Like feed, but yields after every chunk (the number of tokens fed so far), so a caller (a server
        interleaving sessions, a progress bar) gets control back between chunks."""
        ids = self._ids(data)
        for i, _logits in enumerate(self._chunks(ids, False)):
            yield min((i + 1) * self._step(), ids.numel())

    def _step(self) -> int:
        """Tokens per forward: chunk_size, or less where the policy needs it (sirllm: at most its window,
        so every token is scored before it can be evicted)."""
        return min(self.chunk_size, getattr(self.policy, "max_chunk", None) or self.chunk_size)

    @torch.inference_mode()
    def _chunks(self, ids: torch.Tensor, all_logits: bool, prompt: bool = True) -> Iterator[torch.Tensor]:
        wants = getattr(self.policy, "wants_logits", False)  # sirllm scores tokens from every position's logits
        step = self._step()
        for start in range(0, ids.numel(), step):
            chunk = ids[start : start + step].unsqueeze(0).to(self.model.device)
            logits = self._forward(chunk, all_logits or wants)
            if wants:
                self.policy.observe_logits(chunk[0], logits, self.logits)
                logits = logits if all_logits else logits[-1:]
            self.logits = logits[-1]
            self._prompt_tokens += chunk.shape[1] if prompt else 0
            yield logits

    def _forward(self, chunk: torch.Tensor, all_logits: bool) -> torch.Tensor:
        if isinstance(self.policy, Recompute):
            return self.policy.forward(self.model, chunk, all_logits).float()
        step = compiled.decode_step(self.model) if chunk.shape[1] == 1 else None  # (one token: its logits are all)
        if step is not None and not step.failed:
            position_ids = self.policy.position_ids(1).to(chunk.device)
            try:
                if self.policy.prepare_decode():  # steady state: the fixed-shape step (see compiled.py)
                    return step(self.model, self.policy, chunk, position_ids)[0].float()
                return self._eager(chunk, position_ids, all_logits)
            finally:
                self.policy.end_decode()
        return self._eager(chunk, self.policy.position_ids(chunk.shape[1]).to(chunk.device), all_logits)

    def _eager(self, chunk: torch.Tensor, position_ids: torch.Tensor, all_logits: bool) -> torch.Tensor:
        out = self.model(
            input_ids=chunk,
            position_ids=position_ids,
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

    def generate(self, max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """Yield text pieces as tokens are sampled (greedy unless temperature > 0; see generate_tokens for
        the options). Every sampled token is fed back into the stream, so generation can go on far beyond
        the model's trained context. `last_finish_reason` is "stop" or "length" afterwards."""
        for _token_id, piece in self.generate_tokens(max_new_tokens, **kwargs):
            if piece:
                yield piece

    def generate_tokens(self, max_new_tokens: int = 256, *, temperature: float = 0.0, top_p: float = 1.0,
                        top_k: int = 0, seed: int | None = None, stop: Sequence[str] = (), stop_on_eos: bool = True,
                        prompt: str | Sequence[int] | None = None) -> Iterator[tuple[int, str]]:
        """Yield (token_id, text_piece) per sampled token. A piece may be "" while a stop string could still
        be starting (held-back text is released when it turns out not to be one); a last (-1, text) flushes
        what was held back. The stop string itself is never yielded, but it is in the stream (`last_text`)."""
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
        prefix_off = read_off = 0  # incremental detokenisation: decode only the tail, not the whole text
        text = ""  # decoded so far
        emitted = 0  # characters of `text` already yielded
        longest = max((len(s) for s in stop), default=0)
        self.last_usage = {"prompt_tokens": self._prompt_tokens, "completion_tokens": 0}
        self._prompt_tokens = 0
        self.last_finish_reason, self.last_text, self.last_eos = "length", "", False
        for _ in range(max_new_tokens):
            token = sampler(self.logits)
            for _logits in self._chunks(torch.tensor([token]), False, prompt=False):
                pass  # the stream always holds every generated token
            self.last_usage["completion_tokens"] += 1
            if token in eos:
                self.last_finish_reason, self.last_eos = "stop", True
                break
            ids.append(token)
            if self.tokenizer is not None:
                before = self.tokenizer.decode(ids[prefix_off:read_off], skip_special_tokens=True)
                after = self.tokenizer.decode(ids[prefix_off:], skip_special_tokens=True)
                if len(after) > len(before) and not after.endswith("\ufffd"):
                    text += after[len(before):]
                    prefix_off, read_off = read_off, len(ids)
                    self.last_text = text
            hits = [i for i in (text.find(s, max(0, emitted - longest)) for s in stop) if i >= 0]
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
    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        if not messages:
            return ""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("chat needs a tokenizer with a chat template (use feed/generate for plain text)")
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    def _template_context(self) -> list[dict]:
        """The already-fed messages the template is rendered over: the system prompt (if any) and the last
        one. Diffing two renders of this short tail gives exactly what new messages add, at a cost that
        does not grow with the conversation."""
        fed = self.messages[: self._n_fed]
        head = fed[:1] if fed and fed[0]["role"] == "system" else []
        return head + (fed[-1:] if len(fed) > len(head) else [])

    @staticmethod
    def _added(before: str, after: str) -> str:
        """What `after` adds to `before` (their common prefix removed)."""
        if after.startswith(before):
            return after[len(before):]
        common = 0  # the template rewrote earlier text (e.g. stripped whitespace): append from where it differs
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        return after[common:]

    def _open(self, new: list[dict], add_generation_prompt: bool) -> tuple[list[dict], str, str]:
        """Template text for `new` plus any messages appended to `self.messages` but not fed yet (e.g. a
        system prompt). Returns (messages it covers, rendered text ending with them, text to feed)."""
        covered = self._template_context() + self.messages[self._n_fed :] + new
        rendered = self._render(covered, add_generation_prompt)
        return covered, rendered, self._added(self._render(self._template_context(), False), rendered)

    def add_messages(self, messages: list[dict]) -> None:
        """Append whole messages (e.g. an earlier conversation a client resends) to the stream with the
        chat template, without generating."""
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        _, _, text = self._open(messages, add_generation_prompt=False)
        if text:
            self.feed(text)
        self.messages.extend(messages)
        self._n_fed = len(self.messages)

    def chat(self, message: str, **generate_kwargs) -> Iterator[str]:
        """One chat turn: the user message is appended to the stream with the chat template, the reply is
        streamed back, and the closing of the assistant turn is fed so the next turn continues cleanly.
        Yields "" between prefill chunks of a long message, so a caller can interleave other work."""
        if not isinstance(message, str) or not message.strip():
            raise ValueError("empty chat message")
        turn = {"role": "user", "content": message}
        covered, opened, text = self._open([turn], add_generation_prompt=True)
        for _ in self.feed_iter(text):
            yield ""
        self.messages.append(turn)
        self._n_fed = len(self.messages)
        yield from self.generate(**generate_kwargs)
        reply = {"role": "assistant", "content": self.last_text}  # what the stream holds, stop string included
        held = opened + self.last_text + (self.tokenizer.eos_token if self.last_eos else "")
        closing = self._added(held, self._render(covered + [reply], add_generation_prompt=False))
        if closing:
            self.feed(closing)
        self.messages.append(reply)
        self._n_fed = len(self.messages)
        self.end_turn()

    def end_turn(self) -> None:
        """A chat turn is over: policies that age their scores per turn (sirllm's decay) are told."""
        if hasattr(self.policy, "end_turn"):
            self.policy.end_turn()

    # ---- introspection / persistence ---------------------------------------------------------------
    def stats(self) -> dict:
        p = self.policy
        return {
            **p.describe(),
            "tokens_seen": p.seen,
            "tokens_cached": p.n_cached,
            "cache_bytes": p.nbytes(),
            "next_position": getattr(p, "next_pos", None),
            **(p.memory_stats() if hasattr(p, "memory_stats") else {}),  # memory: resident tokens, store tiers, hits
        }

    def state_dict(self, copy: bool = True) -> dict:
        """Everything needed to continue exactly. copy=False returns views of the live buffers (cheaper to
        save; only safe while nothing else feeds the session)."""
        return {"policy": self.policy.state_dict(copy=copy), "logits": self.logits, "messages": list(self.messages),
                "messages_fed": self._n_fed, "prompt_tokens": self._prompt_tokens}

    def load_state_dict(self, state: dict) -> None:
        self.policy.load_state_dict(state["policy"])
        self.logits = state["logits"]
        self.messages = list(state["messages"])
        self._n_fed = state.get("messages_fed", len(self.messages))
        self._prompt_tokens = state.get("prompt_tokens", 0)
