"""A compiled decode step: `torch.compile` of the one-token forward, for sink, window, memory, h2o, sirllm and duo
with block-store retrieval heads (every bounded policy).

Why: at one token per step a 135M model runs ~800 small ops, and on a 2-core CPU their per-op cost (Python,
dispatch, allocation) is a large share of a step next to the weight reads (issue 10's profile: ~28 of 95 ms).
Inductor fuses the norms, rotations and activations into a few C++ loops and drops that overhead.

What makes it traceable (gpt-fast's recipe: fixed shapes, bookkeeping outside): `StreamingCache.prepare_decode`
makes the step's plan before the forward, in eager Python, and hands the layers a `_StaticStep` of tensors
only (the slot the new token goes to, the pinned slots and their rotation). In steady state (cache full)
every layer then writes one slot and attends over its whole buffer, so the shapes are the same at every
position and the step is traced once per model and cache shape, then replayed. Steps that are not steady
(the cache still filling, a position restart, prefill chunks) and duo with dense retrieval heads (their
evicted buffer grows with the stream: no fixed shape) run eagerly: the same cache code, so both paths keep
one state.

Attention in a compiled step is `attention.attend_one_traced` for every policy (sink and window through
`StreamingCache._static_extras`, memory through its own `_attend_static`): the one query's scores and
weighted values written as products and reductions, which inductor fuses into two loops per layer, instead
of a call to SDPA's fused kernel (sink) or four small matmuls (memory). In-process A/B on the embedded model,
int4, 2 threads, AMD EPYC, old and new alternated 9 times in blocks of 32 steps: sink at 2k 16.9 -> 15.9 ms
a step (median), memory at 8k 21.7 -> 21.2 ms. What a steady step of `memory` costs after that (profiled,
per step): int4 linears 4.2 ms, attention 6.4 ms (the weighted sum of 1,859 values 4.1 of it), the int8
output head 2.6 ms, the Python wrapper that calls inductor's kernels 3.1 ms and dynamo's guard checks 2.1 ms.
Inductor's size asserts are off: the guards already check every input's shape and strides, and the asserts'
1,066 calls cost 0.5 ms a step (the wrapper's profiled time 2.36 -> 1.82 ms, sink).

Two more cuts of that per-step cost (7 Dec 2026, a 2-core Intel Xeon with AMX, int4, profiled per step):
* **The C++ wrapper** (`cpp_wrapper`): inductor's kernels are called from generated C++ instead of a Python
  function of ~1,000 calls. `memory` at 4k: the compiled region 27.6 -> 24.0 ms a step; `sink` at 2k, old
  and new alternated in their own processes, 3 rounds: 23.4 / 21.2 / 23.6 -> 19.6 / 20.8 / 21.9 ms. It costs
  compile time once: the embedded model's first compiled `sink` step 75 -> 131 s with a cold inductor cache
  (13 s either way once the cache on disk holds it). Most of that is the wrapper's own C++ (one large function
  of kernel calls) built at -O3, so it is built apart from the kernels, at -O1 (`cpp_wrapper_build_separate`;
  pytorch issue 156037 warns the step may get slower). Measured (7 Dec 2026, AMD EPYC, 2 threads, int4 `sink`
  at 2k, each child a fresh inductor cache, alternated, 4 rounds; docs/results/compile_build_separate_ab_epyc.json):
  a whole cold child (load, compile, 2k prefill, 128 steps) 157 -> 92 s, median step 15.6 / 14.7 / 14.5 / 18.4
  -> 13.8 / 16.9 / 14.0 / 16.5 ms: no slower step shows above the machine's noise.
* **Guards on the model's modules dropped** (`_guard_filter`): of the ~8,400 guards of a `memory` step, ~7,000
  check the model's modules (their hooks, attributes, and every weight's shape, dtype and strides); the 480
  weight checks alone cost ~1.8 ms a step. Checked per step: `sink` 1.77 -> 0.39 ms (torch's
  `use_recursive_dict_tags_for_guards` gave 0.81 ms; it is a process-wide setting, and it too takes
  tensors as unchanging). Every guard on the cache, the inputs and the model's config stays, so a graph
  still never runs for another cache shape. What replaces the dropped ones (`_Decode._check_weights`): each
  model compiles its own graphs (a code object of its own: dynamo keeps graphs per code object), and each
  step compares every weight's storage with what it was at the first step (~60 us): a weight swapped in place
  (`p.data = ...`, as `model.to(dtype)` does) makes the step compile anew (tests/test_compiled.py). Not
  detected, after a model's first compiled step: a parameter or module replaced by another object, a forward
  hook added, a module's attribute changed (streamkv itself does none of these; `compiled.disable` and
  `enable` again start afresh).

`h2o` and `sirllm` (scored.py) attend themselves too: in steady state (window and heavy sets full) a step
evicts exactly one token, the window's oldest, and each KV head's heavy set trades at most one of its N
tokens for it, so the step's attention over [buffer, heavy set], the attention each token received (h2o),
the policy's `score()` on the N+1 candidates and each head's argmin are fixed-shape tensor ops
(`ScoredCache._attend_static`); the places' cos/sin and a sirllm token's surprisal are looked up before it.

`memory` attends itself (sinks + window + retrieved blocks, the query rotated for the blocks). Its steps
between two choices of blocks change only the new token's slot, so they are steady too (`MemoryCache.
_static_steady`): every layer attends its whole slot buffer, the slots not in use masked (the window
refills after each block leaves), plus the K*B retrieved tokens, through the policy's own `_attend_static`.
That function reaches the traced attention as a keyword argument of the forward (`streamkv_static`), which
transformers hands on to every layer's attention function; steps that choose blocks, read them from the
store, evict or store a block run eagerly.

`duo` with `retrieval=memory` is memory's layout per run of heads: its steps between two choices are steady
in the same way, and its `_attend_static` attends each run of neighbouring heads of one kind as the eager
step does (streaming runs the slot buffer; retrieval runs its window slots, their blocks and their sinks
rotated from the pristine copies), and with `rep_rule=attention` adds the attention each slot received (the
keys its blocks are then indexed by).

With `choose=ahead` (memory's parameter) a step that chooses does it after its attention, for the next
steps: those steps are steady too, each layer's query is copied into a buffer by the traced attention, and
`StreamingCache.finish_static` chooses and reads the blocks after the compiled forward.

Why the steps that choose blocks (by default, before their attention) are not compiled too: each layer chooses with its own query, in mid-forward,
and may read blocks from disk, which cannot be traced. Tried (24 Nov, not kept): letting those steps take the
static path with the choice and fetch behind `torch.compiler.disable`. Dynamo then splits the forward at
every layer (97 graphs for the embedded model), and the steps between choices, compiled as one graph before,
ran ~2x slower (int4 at 8k, AMD EPYC, old/new alternated 3 times: 18.5-19.8 vs 33-39 ms); the choosing steps
got slower too (46-56 vs 66-82 ms).

Exactness: the compiled step runs the same arithmetic as the eager one, reordered by inductor's fusions and
summed in another order by `attend_one_traced` (float32: logits within 1e-4 of eager, tests/test_compiled.py).
Where compiling fails (no C++ compiler, an operator inductor cannot lower) the step falls back to eager with
one warning, and stays eager for that model (sessions then take the ordinary eager path: `StreamSession`
checks `failed`).
"""
from __future__ import annotations

import types
import warnings
import weakref

import torch

_STEPS: "weakref.WeakKeyDictionary[torch.nn.Module, _Decode]" = weakref.WeakKeyDictionary()


def _forward(model, cache, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
    static = cache._static
    # a policy that attends itself: its static step reaches the attention function through the forward's kwargs
    extra = {"streamkv_static": static} if static is not None and static.attend is not None else {}
    return model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                 logits_to_keep=1, **extra).logits


def _guard_filter(entries) -> list[bool]:
    """Which of dynamo's guards a compiled step checks at every call: all but those on the model's modules
    (the module docstring says why, and what checks the weights instead)."""
    return [not (e.name.startswith("model._modules") or e.name.startswith("L['model']._modules")) for e in entries]


def _weights(model) -> list[torch.Tensor]:
    return [*model.parameters(), *model.buffers()]


class _Decode:
    """One model's compiled step (dynamo keeps one graph per cache shape; sessions of one shape share it)."""

    def __init__(self):
        import torch._dynamo

        # one graph per cache shape; the default limit (8) would silently fall back to eager
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        self.fn = self._compile()
        self.failed: str | None = None
        self.steps = 0  # compiled steps run (tests check the path was taken)
        self.recompiles = 0  # fresh compilations because the model's weights moved (`_check_weights`)
        self._weights: list[torch.Tensor] | None = None  # the model's parameters and buffers at the first step
        self._ptrs: tuple = ()

    @staticmethod
    def _compile():
        # a code object of its own: dynamo keeps its graphs per code object, so this model's graphs are never
        # tried on another model (their guards no longer check the model's modules: `_guard_filter`)
        fresh = types.FunctionType(_forward.__code__.replace(), _forward.__globals__, "_forward")
        # C++ wrapper: the compiled step calls its kernels from C++, not from a Python function of ~1,000 calls,
        # and that wrapper is built apart from the kernels, at -O1 (a cold compile 40% shorter, module docstring);
        # size_asserts off: dynamo's guards check every input's shape and strides already (module docstring)
        return torch.compile(fresh, dynamic=False,
                             options={"cpp_wrapper": True, "cpp_wrapper_build_separate": True, "size_asserts": False,
                                      "guard_filter_fn": _guard_filter})

    def _check_weights(self, model) -> None:
        """Compile anew if any weight's storage moved since the first step (a dtype or device change, a `.data`
        swap): the graphs were made for those tensors' shapes and dtypes. (A parameter or module replaced by
        another object is not seen here: the module docstring lists what is not detected.)"""
        if self._weights is not None and tuple(map(torch.Tensor.data_ptr, self._weights)) == self._ptrs:
            return
        if self._weights is not None:  # a weight moved since the first step (or the last fresh compile)
            self.fn, self.recompiles = self._compile(), self.recompiles + 1
        self._weights = _weights(model)
        self._ptrs = tuple(map(torch.Tensor.data_ptr, self._weights))

    def __call__(self, model, cache, input_ids, position_ids) -> torch.Tensor:
        out = None
        if self.failed is None:
            try:
                self._check_weights(model)
                out = self.fn(model, cache, input_ids, position_ids)
                self.steps += 1
            except Exception as e:  # noqa: BLE001 - any compile failure: warn once, decode eagerly
                self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                warnings.warn(f"compiled decoding is unavailable for this model ({self.failed}); decoding eagerly",
                              RuntimeWarning, stacklevel=3)
                if cache._static is not None:
                    cache._static.calls = 0  # the eager run below does the step again (its writes are idempotent)
        if out is None:  # the same step, not compiled (the cache's writes are the same: a slot and the pins)
            out = _forward(model, cache, input_ids, position_ids)
        cache.check_static()
        cache.finish_static()
        return out


def enable(model) -> None:
    """Compile `model`'s one-token steps (on first use) for every session on it."""
    if model not in _STEPS:
        _STEPS[model] = _Decode()


def disable(model) -> None:
    _STEPS.pop(model, None)


def decode_step(model) -> _Decode | None:
    """The compiled step of `model`, or None when compiled decoding is off for it."""
    return _STEPS.get(model)
