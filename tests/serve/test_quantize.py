"""Post-training quantization with nvidia-modelopt (fake quantization on CPU).

The references are independent of modelopt's megatron path: FP8 e4m3 rounding done with
torch's own float8 dtype, the int4 grid (at most 16 levels per block), and modelopt's
HF export, calibrated separately on the transformers FlexOlmo.
"""

import json

import pytest
import torch

import megatron_bar
from helpers import run_tool
from megatron_bar.serve import quantize as q
from megatron_bar.utils.fs import incomplete_path

pytest.importorskip("modelopt")
from modelopt.torch.quantization.nn import TensorQuantizer  # noqa: E402

FP8_MAX = 448.0


@pytest.fixture(scope="module")
def calib_args(toy_data):
    return [f"tool_use={toy_data['tool_use']}", f"general={toy_data['general']}"]


@pytest.fixture(scope="module")
def calib(bar_merged, calib_args):
    return q.calibration_set(bar_merged, q.parse_calib_args(calib_args), fraction=0.05, seed=0,
                             seq_length=128, source="test")


@pytest.fixture(scope="module")
def fp8(bar_merged, calib_args, tmp_path_factory):
    """The tool, end to end: fp8, with modelopt's HF export."""
    root = tmp_path_factory.mktemp("fp8")
    proc = run_tool("quantize.py", "--load", str(bar_merged), "--save", str(root / "ckpt"),
                    "--format", "fp8", "--calib", *calib_args, "--export-hf", str(root / "hf"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root / "ckpt", root / "hf"


def quantizers(model):
    return {n: m for n, m in model.gpt.named_modules() if isinstance(m, TensorQuantizer) and m.is_enabled}


def greedy(model, prompt, n=6):
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids)[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    return ids[:, prompt.size(1):]


def prompt_tokens(vocab, seed=0):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_fp8_checkpoint_loads_generates_and_matches_fp8_rounding(bar_merged, fp8):
    ckpt, _ = fp8
    meta = json.loads((ckpt / q.QUANT_META_FILE).read_text())
    assert meta["format"] == "fp8" and meta["quantizers"]["router_quantizers"] == 0
    assert set(meta["calibration"]["domains"]) == {"tool_use", "general"}
    source, model = megatron_bar.load_model(bar_merged), megatron_bar.load_model(ckpt)
    qs = quantizers(model)
    # qkv, proj and 3 experts x (fc1, fc2), weights and inputs, in each of 2 layers
    assert len(qs) == 2 * 8 * 2
    assert not any(".router" in n or "output_layer" in n or "embedding" in n for n in qs)
    layer = model.gpt.decoder.layers[0]
    src_layer = source.gpt.decoder.layers[0]
    # the router is the source's, in fp32
    assert layer.mlp.router.weight.dtype == torch.float32
    assert torch.equal(layer.mlp.router.weight, src_layer.mlp.router.weight)
    # FP8 e4m3 per-tensor fake quantization, by torch's own float8 rounding
    lin = layer.mlp.experts.local_experts[1].linear_fc2
    w = lin.weight.detach()
    scale = lin.weight_quantizer.amax.float() / FP8_MAX
    want = (w / scale).to(torch.float8_e4m3fn).float() * scale
    with torch.no_grad():
        torch.testing.assert_close(lin.weight_quantizer(w), want, rtol=0, atol=1e-7)
        assert not torch.equal(want, w)
    # loads and generates; close to the source, not equal to it
    tokens = prompt_tokens(model.config.vocab_size)
    with torch.no_grad():
        ref, got = source(tokens), model(tokens)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.3, rel
    out = greedy(model, tokens)
    assert out.shape == (2, 6) and ((0 <= out) & (out < model.config.vocab_size)).all()
    # expert selection composes with quantization
    dropped = megatron_bar.load_model(ckpt, drop_experts=["general"])
    assert torch.isfinite(dropped(tokens)).all()


def test_hf_export_agrees_with_megatron_calibration(fp8):
    """modelopt's HF export (vLLM's modelopt FP8 format), calibrated on the transformers
    FlexOlmo, against the megatron checkpoint's quantizers: same ranges, same weights."""
    from safetensors.torch import load_file

    ckpt, hf = fp8
    config = json.loads((hf / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "modelopt"
    assert config["quantization_config"]["quant_algo"] == "FP8"
    assert all("mlp.gate" in m or m in ("lm_head", "model.embed_tokens")
               for m in config["quantization_config"]["ignore"])  # routers kept in high precision
    st = load_file(hf / "model.safetensors")
    assert st["model.layers.0.mlp.gate.weight"].dtype == torch.float32
    model = megatron_bar.load_model(ckpt)

    def amax(key):
        return (st[f"{key}.input_scale"] * FP8_MAX).reshape(())

    for i, layer in enumerate(model.gpt.decoder.layers):
        attn, experts = layer.self_attention, layer.mlp.experts.local_experts
        pairs = [(attn.linear_proj, f"model.layers.{i}.self_attn.o_proj")]
        pairs += [(experts[e].linear_fc2, f"model.layers.{i}.mlp.experts.{e}.down_proj") for e in range(3)]
        for lin, key in pairs:
            assert st[f"{key}.weight"].dtype == torch.float8_e4m3fn
            dequant = st[f"{key}.weight"].float() * st[f"{key}.weight_scale"]
            with torch.no_grad():
                torch.testing.assert_close(dequant, lin.weight_quantizer(lin.weight), rtol=1e-5, atol=1e-7)
        # activation ranges: the same where both calibrations see the same tokens (the
        # attention output; every token reaches some expert's fc1). modelopt's HF MoE
        # calibration also runs each token through experts it is not routed to, so an
        # expert's fc2 input range there can only be wider.
        torch.testing.assert_close(amax(f"model.layers.{i}.self_attn.o_proj"),
                                   attn.linear_proj.input_quantizer.amax.reshape(()), rtol=1e-5, atol=0)
        for e in range(3):
            torch.testing.assert_close(amax(f"model.layers.{i}.mlp.experts.{e}.gate_proj"),
                                       experts[e].linear_fc1.input_quantizer.amax.reshape(()),
                                       rtol=1e-5, atol=0)
            assert amax(f"model.layers.{i}.mlp.experts.{e}.down_proj") >= \
                experts[e].linear_fc2.input_quantizer.amax.reshape(()) * (1 - 1e-5)


@pytest.mark.parametrize("fmt", ["int8", "int4_awq"])
def test_int_formats_load_and_generate(bar_merged, calib, fmt, tmp_path):
    """Errors are measured on a calibration document: an untrained model's activations on
    random tokens fall outside the calibrated ranges and are clipped."""
    out = tmp_path / fmt
    small = q.CalibrationSet(calib.documents[:1] + calib.documents[-1:], calib.source, calib.fraction,
                             calib.seed, calib.seq_length)  # one document per domain: AWQ is slow
    q.quantize_checkpoint(bar_merged, out, fmt, small, progress=False, print_fn=lambda *a: None)
    source, model = megatron_bar.load_model(bar_merged), megatron_bar.load_model(out)
    qs = quantizers(model)
    weights = {n: m for n, m in qs.items() if n.endswith("weight_quantizer")}
    assert len(weights) == 16 and not any(".router" in n for n in qs)
    lin = model.gpt.decoder.layers[1].mlp.experts.local_experts[2].linear_fc1
    with torch.no_grad():
        wq = lin.weight_quantizer(lin.weight)
    if fmt == "int4_awq":
        assert not any(n.endswith("input_quantizer") and m.is_quant_enabled for n, m in qs.items())
        block = q.quant_config(q.get_format(fmt), model.config)["quant_cfg"][1]["cfg"]["block_sizes"][-1]
        blocks = wq.reshape(wq.size(0), -1, block)
        levels = max(len(torch.unique(blocks[r, b])) for r in range(4) for b in range(blocks.size(1)))
        assert 8 < levels <= 16, levels  # a 4-bit grid per block
    else:
        levels = max(len(torch.unique(wq[r])) for r in range(4))
        assert 16 < levels <= 255, levels  # an 8-bit grid per output channel
    tokens = torch.tensor([calib.documents[0][1]])
    with torch.no_grad():
        ref, got = source(tokens), model(tokens)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(fmt, "relative logit error", rel)
    assert 0 < rel < (0.3 if fmt == "int8" else 0.5), rel
    assert greedy(model, tokens).shape == (1, 6)


def test_unknown_format_fails_before_anything(bar_merged, tmp_path):
    out = tmp_path / "never"
    proc = run_tool("quantize.py", "--load", str(bar_merged), "--save", str(out), "--format", "fp4")
    assert proc.returncode == 1
    assert "error: unknown format 'fp4'; choose one of fp8, int8, int4_awq" in proc.stderr
    assert not out.exists() and not incomplete_path(out).exists()


def test_calibration_missing_a_domain(bar_merged, toy_data, tmp_path):
    calib = q.calibration_set(bar_merged, [("tool_use", str(toy_data["tool_use"]), "chat")],
                              source="only-tool-use")
    out = tmp_path / "never"
    with pytest.raises(q.QuantizationError, match=r"only-tool-use: the calibration set has no "
                                                  r"documents of domain\(s\) \['general'\]"):
        q.quantize_checkpoint(bar_merged, out, "int8", calib, print_fn=lambda *a: None)
    assert not out.exists() and not incomplete_path(out).exists()


def test_default_calibration_is_the_runs_router_sample(bar_merged, toy_data, tmp_path):
    """A checkpoint inside a router-stage run calibrates on that stage's stratified sample:
    the config's datasets, sample_fraction and seed; no run config is an error."""
    import shutil

    run = tmp_path / "router"
    ckpt = run / "checkpoints" / "iter_0000001"
    shutil.copytree(bar_merged, ckpt)
    config = {"model": {"load": str(bar_merged)}, "train": {"stage": "router", "seed": 7},
              "data": {"seq_length": 64, "sample_fraction": 0.1, "datasets": [
                  {"path": str(toy_data["tool_use"]), "kind": "chat", "domain": "tool_use"},
                  {"path": str(toy_data["general"]), "kind": "chat", "domain": "general"}]}}
    (run / "config.json").write_text(json.dumps(config))
    assert q.default_calibration_config(ckpt) == run / "config.json"
    calib = q.calibration_from_config(ckpt, run / "config.json")
    assert calib.domains() == {"tool_use": 6, "general": 6}  # 10% of 64 per domain
    assert (calib.seed, calib.fraction, calib.seq_length) == (7, 0.1, 64)
    assert calib.documents == q.calibration_from_config(ckpt, run / "config.json").documents
    proc = run_tool("quantize.py", "--load", str(bar_merged), "--save", str(tmp_path / "x"),
                    "--format", "int8")
    assert proc.returncode == 1 and "not inside a training run" in proc.stderr
    assert not (tmp_path / "x").exists()
