"""Weight-only quantisation (tiny models, fast): QuantLinear error bounds, model-wide replacement, load()
options (--quantize / --device) and their CLI flags."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eval_helpers import ROOT, save_tiny, tiny_model
from streamkv import quantize
from streamkv.models import load, resolve_device
from streamkv.quantize import INT4_GROUP_SIZE, QUANTIZE_MODES, QuantLinear, check_mode, quantize_model
from streamkv.session import StreamSession

BF16_EPS = 2.0**-8  # bfloat16 spacing relative to a value: activations, dequantised weights and outputs round to it


def _linear(n_out=192, n_in=576, bias=True, seed=0):
    torch.manual_seed(seed)
    lin = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.linspace(0.2, 3.0, n_out)[:, None])  # rows of different scale
    return lin


def _bound(q: QuantLinear, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """|y_q - y| allowed: the weight error bound times |x|, plus bfloat16 rounding of the activations, the
    dequantised weights and the output (each at most BF16_EPS relative)."""
    wd = q.dequantize()
    return x.abs() @ q.error_bound().t() + 3 * BF16_EPS * (x.abs() @ wd.abs().t()) + 1e-5


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # 1 and 3: the int kernels; 40: dequantise + GEMM (PREFILL_DTYPE)
def test_quantlinear_output_within_the_quantisation_bound(mode, rows):
    lin = _linear()
    q = QuantLinear(lin, mode)
    w_err = (q.dequantize() - lin.weight).abs()
    assert (w_err <= q.error_bound() + 1e-7).all()  # every weight within half a step (+ zero rounding)
    assert w_err.max() > 0.1 * q.error_bound().max()  # and it really is quantised
    x = torch.randn(2, rows, 576)
    y, y_q = lin(x), q(x)
    assert y_q.shape == y.shape and y_q.dtype == torch.float32
    err = (y_q - y).abs()
    assert (err <= _bound(q, lin, x)).all(), float((err / _bound(q, lin, x)).max())


def test_int4_error_is_larger_than_int8_and_both_small():
    lin = _linear(bias=False)
    x = torch.randn(8, 576)
    with torch.no_grad():
        rel = {m: float((QuantLinear(lin, m)(x) - lin(x)).norm() / lin(x).norm()) for m in ("int8", "int4")}
    assert rel["int8"] < 0.01 < rel["int4"] < 0.15, rel


@pytest.mark.parametrize("gemm_dtype", [torch.bfloat16, torch.float32])  # both CPU kinds, on any CPU
def test_kernel_and_dequantised_paths_agree(gemm_dtype, monkeypatch):
    monkeypatch.setattr(quantize, "PREFILL_DTYPE", gemm_dtype)
    lin = _linear()
    for mode in ("int8", "int4"):
        q = QuantLinear(lin, mode)
        x = torch.randn(1, 576)
        via_kernel = q(x)
        many = x.expand(40, 576)  # more rows than the kernel path takes
        via_dequant = q(many)
        assert torch.allclose(via_kernel, via_dequant[:1], rtol=2e-2, atol=2e-2 * float(via_kernel.abs().max()))
        # the many-rows path is exactly a GEMM in that dtype with the dequantised weight
        exact = F.linear(many.to(gemm_dtype), q.dequantize(gemm_dtype)).float() + lin.bias.detach()
        assert torch.equal(via_dequant, exact)
        assert (via_dequant - lin(many)).abs().max() <= _bound(q, lin, many).max()


def test_prefill_gemm_dtype_follows_the_cpu():
    """bfloat16 only where the CPU multiplies it in hardware (emulated bfloat16 was 7-8x slower on an
    AVX2-only EPYC); this asserts the rule against torch's own cpuinfo probes."""
    hardware = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert quantize.native_bf16() == hardware
    assert quantize.PREFILL_DTYPE == (torch.bfloat16 if hardware else torch.float32)


def test_unknown_modes_and_bad_groups_are_refused():
    assert check_mode(None) == "none" and QUANTIZE_MODES == ("none", "int8", "int4")
    with pytest.raises(ValueError, match="unknown quantize mode 'int3'; choose one of: none, int8, int4"):
        check_mode("int3")
    with pytest.raises(ValueError, match="int8 or int4"):
        QuantLinear(_linear(), "none")
    with pytest.raises(ValueError, match=r"in_features \(48\) divisible .* group size \(got 32\)"):
        QuantLinear(_linear(n_in=48), "int4", group_size=32)


def test_int4_falls_back_to_int8_where_the_group_does_not_divide():
    model = nn.Sequential(_linear(n_in=64, n_out=48), nn.ReLU(), _linear(n_in=48, n_out=8))
    x = torch.randn(3, 64)
    ref = model(x)
    summary = quantize_model(model, "int4")
    assert summary["fallback_int8"] == ["2"] and summary["layers"] == 2
    assert (model[0].mode, model[0].group_size, model[2].mode) == ("int4", INT4_GROUP_SIZE, "int8")
    assert (model(x) - ref).abs().max() < 0.1 * ref.abs().max()


def test_quantize_model_replaces_every_linear_and_keeps_the_embedding():
    model = tiny_model()
    emb = model.model.embed_tokens.weight.detach().clone()
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    ids = torch.randint(3, 49152, (1, 24))
    with torch.no_grad():
        ref = model(ids).logits
    summary = quantize_model(model, "int4")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    quant = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert not linears and len(quant) == summary["layers"] == 2 * 7 + 1
    assert summary["head"] == "int8" and model.lm_head.mode == "int8"  # the head gets its own int8 copy
    assert model.model.layers[0].mlp.down_proj.mode == "int4"
    assert torch.equal(model.model.embed_tokens.weight, emb) and model.model.embed_tokens.weight.dtype == torch.float32
    assert model.streamkv_quantization is summary
    with torch.no_grad():
        out = model(ids).logits
    assert out.dtype == torch.float32
    rel = float((out - ref).norm() / ref.norm())
    assert 0 < rel < 0.3, rel  # random weights (sharpened x3), 4-bit, through 2 layers: only sanity here
    # streams through a bounded cache like any model
    s = StreamSession(model, None, "sink", sinks=2, window=14, chunk_size=8)
    s.feed(ids[0])
    assert s.stats()["tokens_cached"] == 16


def test_none_changes_nothing():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert quantize_model(model, "none")["layers"] == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_device_checks():
    assert resolve_device(None) == torch.device("cpu") and resolve_device("cpu").type == "cpu"
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="not supported; use cpu, cuda or cuda:N"):
        resolve_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda' was asked for, but .*; use device cpu"):
            resolve_device("cuda")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny"))


def test_load_quantized_folder(tiny_folder):
    ref, _ = load(str(tiny_folder))
    model, tok = load(str(tiny_folder), quantize="int8")
    assert model.streamkv_quantization["mode"] == "int8" and isinstance(model.lm_head, QuantLinear)
    ids = torch.tensor([tok("The grass is green. The sky is", add_special_tokens=False).input_ids])
    with torch.no_grad():
        a, b = ref(ids).logits, model(ids).logits
    assert float((a - b).norm() / a.norm()) < 0.02
    with pytest.raises(ValueError, match="unknown quantize mode"):
        load(str(tiny_folder), quantize="fp8")


def _run(*args):
    return subprocess.run([sys.executable, "-m", "streamkv", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_cli_flags(tiny_folder, tmp_path):
    r = _run("info", "--model", str(tiny_folder), "--quantize", "int4", "--threads", "1")
    assert r.returncode == 0, r.stderr
    assert "int4, groups of 32: 15 linear layers" in r.stdout and "output head int8" in r.stdout
    if not torch.cuda.is_available():
        r = _run("generate", "--model", str(tiny_folder), "--prompt", "x", "--device", "cuda", "--threads", "1")
        assert r.returncode == 2 and "device 'cuda' was asked for" in r.stderr and "Traceback" not in r.stderr
    # the evaluation commands take the same flags and record them
    out = tmp_path / "ppl.json"
    text = tmp_path / "t.txt"
    text.write_text("The grass is green. The sky is blue. " * 20)
    r = _run("eval", "ppl", "--model", str(tiny_folder), "--text", str(text), "--policy", "sink:sinks=4,window=60",
             "--quantize", "int8", "--threads", "1", "--out", str(out), "--plot", "", "--quiet")
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["quantize"]["mode"] == "int8" and res["device"] == "cpu" and res["policies"][0]["ppl"] > 1
