"""Weight-only quantisation of a loaded model's linear layers (int8 or int4), with torch's own CPU kernels.

Why: decoding one token reads every weight once, and on a CPU that read is the floor of the step time
(~24 GB/s on the reference 2-core Xeon: float32 weights ~22 ms/token, int8 ~6 ms, int4 ~3 ms). So each
`nn.Linear` is replaced, after loading, by a `QuantLinear` holding int8 (per output channel) or int4 (per
group of input features) weights. Embeddings, norms, attention and the KV cache stay float32: they are a
small part of the bytes read per token, and the cache stays exactly what streamkv re-rotates.

How it runs (measured on that Xeon, AVX-512 + AMX, torch 2.13; see docs/RESULTS.md section 5):
* Decode (few rows): `torch._weight_int8pack_mm` / `aten._weight_int4pack_mm_for_cpu`. Both are fast only
  with bfloat16 activations (with float32 activations they fall back to a path 10-25x slower), so the
  input is cast to bfloat16 and the output back to the caller's dtype. The kernels need bfloat16 scales.
* Prefill (many rows): those kernels are 2x slower than a float32 GEMM at 512 rows. So the weight is
  dequantised on the fly (~1 ms per MLP matrix) and multiplied with `F.linear`; nothing dequantised is kept.
  The GEMM's dtype depends on the CPU (`PREFILL_DTYPE`, decided once at import): bfloat16 where the CPU
  multiplies bfloat16 in hardware (AMX or AVX512-BF16: 6x faster than float32 on that Xeon), float32
  elsewhere. Without that hardware oneDNN emulates bfloat16, and on an AVX2-only AMD EPYC (Zen 3) a bfloat16
  GEMM at 512 rows took 7-8x the float32 one (RESULTS section 5).
* int4 stores its codes twice: in the kernel's packed layout (CPU-capability dependent, so unreadable to
  us) for decode, and as plain nibble pairs for the prefill dequantisation. Decode reads only the first,
  so a token still costs int4 bandwidth; memory is 1 byte per weight, like int8.

The output head is always int8 (in int4 mode too: measured, an int4 head alone costs +5% perplexity on
SmolLM2). A tied head (`lm_head.weight is embed_tokens.weight`) gets its own quantised copy; the embedding
table stays float32. Replacement goes through the parent module's attribute (`setattr`), no patching, so
any architecture made of `nn.Linear` layers works.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

QUANTIZE_MODES = ("none", "int8", "int4")  # the one list: CLI choices and load() validation read it
INT4_GROUP_SIZE = 32  # input features per int4 scale/zero; 32 matches the Q4_1 blocks of the embedded GGUF
KERNEL_MAX_ROWS = 16  # up to this many rows per call use the int kernels; more rows dequantise + GEMM
_COMPUTE = torch.bfloat16  # the activation dtype the CPU int kernels are fast with


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AMX tiles or AVX512-BF16 dot products). Without
    them a bfloat16 GEMM is emulated and slower than float32 (see the module docstring)."""
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's own cpuinfo probes
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


PREFILL_DTYPE = torch.bfloat16 if native_bf16() else torch.float32  # the dtype of the many-rows GEMM


def _bf16_at_least(x: torch.Tensor) -> torch.Tensor:
    """x in bfloat16, rounded up (round-to-nearest errs by at most 2^-9 relative), so a scale never shrinks
    below what the codes' range needs."""
    return (x * (1 + 2.0**-8)).to(_COMPUTE)


def check_mode(mode: str | None) -> str:
    """`mode` normalised ('none' for None); a clear error for anything else."""
    mode = "none" if mode in (None, "") else mode
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantize mode {mode!r}; choose one of: {', '.join(QUANTIZE_MODES)}")
    return mode


class QuantLinear(nn.Module):
    """A weight-only quantised replacement of one `nn.Linear` (same in/out features, same bias).

    int8: w[n, k] ~= q[n, k] * scale[n], q in [-127, 127] (symmetric, per output channel).
    int4: w[n, k] ~= q[n, k] * scale[n, g] + low[n, g] for k in group g (g = k // group_size), q in [0, 15]
          (asymmetric min/max per group). The kernel's form is (q - 8) * scale + zero with zero = low + 8 scale.
    The largest error on a weight is half a step (`error_bound`).
    """

    def __init__(self, linear: nn.Linear, mode: str, group_size: int = INT4_GROUP_SIZE):
        super().__init__()
        if mode not in ("int8", "int4"):
            raise ValueError(f"QuantLinear quantises to int8 or int4, got {mode!r}")
        w = linear.weight.detach().to(device="cpu", dtype=torch.float32)  # [out, in]
        self.out_features, self.in_features = w.shape
        if mode == "int4" and (group_size < 2 or group_size % 2 or self.in_features % group_size):
            raise ValueError(f"int4 needs in_features ({self.in_features}) divisible by an even group size "
                             f"(got {group_size}); quantise this layer to int8 instead")
        self.mode, self.group_size = mode, group_size if mode == "int4" else None
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        if mode == "int8":
            scale = _bf16_at_least((w.abs().amax(dim=1) / 127).clamp_min(1e-12))  # [out]
            q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)  # [out, in]
            self.register_buffer("qweight", q)
            self.register_buffer("scale", scale)  # [out]
        else:
            groups = w.reshape(self.out_features, -1, group_size)  # [out, in/g, g]
            low, high = groups.amin(dim=2), groups.amax(dim=2)  # [out, in/g]
            scale = _bf16_at_least(((high - low) / 15).clamp_min(1e-12)).float()
            # the kernel computes (q - 8) * scale + zero with bfloat16 scale and zero: pick the codes on that
            # grid (zero rounded first), so the only extra error is where rounding zero pushed a weight
            # off the 16 levels (at most |zero| * 2^-9)
            zero = (low + 8 * scale).to(_COMPUTE).float()
            low = zero - 8 * scale
            q = torch.round((groups - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8)  # [out, in/g, g]
            q = q.reshape(self.out_features, self.in_features)  # [out, in]
            self.register_buffer("nibbles", q[:, 0::2] | (q[:, 1::2] << 4))  # [out, in/2]: even k low, odd k high
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
            # [in/g, out, 2]: the kernel's qScaleAndZeros layout
            self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(_COMPUTE).contiguous())

    def error_bound(self) -> torch.Tensor:
        """Largest |w - dequantize()| of every weight, [out, in] (float32): half a quantisation step, plus
        for int4 the bfloat16 rounding of the group's zero point."""
        if self.mode == "int8":
            return (self.scale.float() / 2)[:, None].expand(self.out_features, self.in_features)
        scale, zero = self.scale_zero.float().unbind(-1)  # [in/g, out] each
        bound = (scale / 2 + zero.abs() * 2.0**-8).t()  # [out, in/g]
        return bound.repeat_interleave(self.group_size, dim=1)  # [out, in]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight the kernels multiply with, [out, in]."""
        if self.mode == "int8":
            return self.qweight.float().mul_(self.scale.float()[:, None]).to(dtype)
        # float32 arithmetic, in place, then one cast: ~4x faster on CPU than the same in bfloat16
        q = torch.stack([self.nibbles & 15, self.nibbles >> 4], dim=-1)  # [out, in/2, 2]
        q = q.reshape(self.out_features, -1, self.group_size).float()  # [out, in/g, g]
        scale, zero = self.scale_zero.float().unbind(-1)  # [in/g, out] each
        scale = scale.t()[..., None]  # [out, in/g, 1]
        low = zero.t()[..., None] - 8 * scale  # (q - 8) * scale + zero = q * scale + low
        return q.mul_(scale).add_(low).reshape(self.out_features, self.in_features).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # [tokens, in]
        if rows.shape[0] > KERNEL_MAX_ROWS:
            out = F.linear(rows.to(PREFILL_DTYPE), self.dequantize(PREFILL_DTYPE))
        elif self.mode == "int8":
            out = torch._weight_int8pack_mm(rows.to(_COMPUTE), self.qweight, self.scale)
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows.to(_COMPUTE), self.packed, self.group_size,
                                                              self.scale_zero)
        out = out.to(x.dtype)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)  # [..., out]

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.group_size else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}{group}, bias={self.bias is not None}"


def quantize_model(model: nn.Module, mode: str, group_size: int = INT4_GROUP_SIZE) -> dict:
    """Replace every `nn.Linear` of `model` by a `QuantLinear` (in place) and return a summary that is also
    stored as `model.streamkv_quantization`. mode 'none' changes nothing.

    In int4 mode two kinds of layer get int8 instead (both listed in the summary):
    * the output head (`get_output_embeddings()`): measured on SmolLM2-135M, an int4 head alone costs +5%
      perplexity while all other layers in int4 cost +0.4% (its tied embedding is stored at higher
      precision than the 4-bit body in the GGUF), and it is ~1/5 of the bytes;
    * layers whose in_features the group size does not divide ('fallback_int8')."""
    mode = check_mode(mode)
    summary = {"mode": mode, "group_size": group_size if mode == "int4" else None, "layers": 0,
               "head": None, "fallback_int8": [], "weight_bytes": None}
    if mode != "none":
        devices = {p.device.type for p in model.parameters()}
        if devices - {"cpu"}:
            raise ValueError(f"quantize={mode} uses torch's CPU kernels; the model is on {', '.join(sorted(devices))}. "
                             "On a GPU use dtype bfloat16 (or quantize none).")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        targets = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        for name, linear in targets:
            layer_mode = mode
            if linear is head:
                layer_mode = summary["head"] = "int8"
            elif mode == "int4" and linear.in_features % group_size:
                layer_mode = "int8"
                summary["fallback_int8"].append(name)
                log.warning("%s: in_features %d is not a multiple of the int4 group size %d; quantised to int8",
                            name, linear.in_features, group_size)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, QuantLinear(linear, layer_mode, group_size))
        summary["layers"] = len(targets)
        summary["weight_bytes"] = sum(b.numel() * b.element_size() for m in model.modules()
                                      if isinstance(m, QuantLinear) for b in m.buffers())
    model.streamkv_quantization = summary
    return summary


__all__ = ["QUANTIZE_MODES", "INT4_GROUP_SIZE", "QuantLinear", "check_mode", "quantize_model"]
