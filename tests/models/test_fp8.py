"""FP8 block-wise checkpoints (models/fp8.py, models/tiny_fp8.py): lazy dequantization (reads only
the narrowed fp8 box and its scale blocks), tiny FP8 checkpoints of llama / deepseek_v3, their
dequantized reference in transformers and in our loader, and the refused inputs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from test_loader import build
from transformers import AutoModelForCausalLM

import dpattn.models.loader as loader
from dpattn.layers.weights import LazyTensor, ReadContext, cat, load_param, stack
from dpattn.models.fp8 import (
    Fp8BlockTensor,
    checkpoint_fp8_block,
    dequantize_block,
    dequantize_fp8,
    fp8_block_size,
)
from dpattn.models.tiny_fp8 import (
    is_quantized_key,
    main,
    quantize_block,
)

BLOCK = (24, 40)  # the fp8_models fixture's (tests/conftest.py FP8_BLOCK; checked below)


class Recording:
    """An in-memory TensorSource that records the boxes read from it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.shape, self.dtype = t, tuple(t.shape), t.dtype
        self.reads: list[tuple[tuple[int, int], ...]] = []

    def read(self, index: tuple[slice, ...], ctx: ReadContext) -> torch.Tensor:
        self.reads.append(tuple((s.start, s.stop) for s in index))
        return self.t[index].clone()


def _random_fp8(shape: tuple[int, ...], block: tuple[int, int], seed: int) -> tuple[Any, ...]:
    gen = torch.Generator().manual_seed(seed)
    q, s = quantize_block(torch.randn(shape, generator=gen), block)
    s = s * torch.rand(s.shape, generator=gen).add(0.5)  # scales unrelated to the data
    wsrc, ssrc = Recording(q), Recording(s)
    lazy = dequantize_fp8(
        {"w": LazyTensor.from_source(wsrc), "w_scale_inv": LazyTensor.from_source(ssrc)}, block
    )
    assert list(lazy) == ["w"] and isinstance(lazy["w"], Fp8BlockTensor)
    return lazy["w"], dequantize_block(q, s, block), wsrc, ssrc


@pytest.mark.parametrize(
    "shape,block", [((70, 45), (16, 32)), ((33, 128), (32, 32)), ((3, 50, 29), (8, 7))]
)
def test_lazy_narrow_equals_eager_and_reads_only_its_blocks(
    shape: tuple[int, ...], block: tuple[int, int]
) -> None:
    lazy, ref, wsrc, ssrc = _random_fp8(shape, block, seed=len(shape))
    assert torch.equal(lazy.materialize(), ref)
    gen = torch.Generator().manual_seed(1)
    rows, cols = shape[-2:]
    lead = len(shape) - 2
    for _ in range(12):
        r0 = int(torch.randint(0, rows, (1,), generator=gen))
        c0 = int(torch.randint(0, cols, (1,), generator=gen))
        n = int(torch.randint(1, rows - r0 + 1, (1,), generator=gen))
        m = int(torch.randint(1, cols - c0 + 1, (1,), generator=gen))
        view = lazy.narrow(lead, r0, n).narrow(lead + 1, c0, m)
        want = ref.narrow(lead, r0, n).narrow(lead + 1, c0, m)
        if lead:  # and one expert of the leading dim
            view, want = view.narrow(0, 1, 1), want.narrow(0, 1, 1)
        wsrc.reads.clear()
        ssrc.reads.clear()
        assert torch.equal(view.materialize(), want)
        box = ((1, 2),) * lead
        assert wsrc.reads == [(*box, (r0, r0 + n), (c0, c0 + m))]
        i0, i1 = r0 // block[0], -(-(r0 + n) // block[0])
        j0, j1 = c0 // block[1], -(-(c0 + m) // block[1])
        assert ssrc.reads == [(*box, (i0, i1), (j0, j1))]
    # one row (column) from a single block row (column) of scales
    assert torch.equal(lazy.narrow(lead, rows - 1, 1).materialize(), ref.narrow(lead, rows - 1, 1))
    assert lazy.narrow(lead + 1, 0, 0).materialize().shape[-1] == 0


def test_cat_stack_chunk_of_dequantized_tensors() -> None:
    """As the loader fuses gate/up and stacks experts, then narrows to a rank's shard."""
    parts = [_random_fp8((30, 45), (16, 32), seed=e) for e in range(6)]
    lazy = stack([cat([parts[e][0], parts[e + 3][0]]) for e in range(3)])  # [3, 60, 45]
    ref = torch.stack([torch.cat([parts[e][1], parts[e + 3][1]]) for e in range(3)])
    assert torch.equal(lazy.materialize(), ref)
    for dim, start, length in [(0, 1, 2), (1, 17, 29), (1, 30, 30), (2, 5, 33), (2, 44, 1)]:
        view = lazy.narrow(dim, start, length)
        assert torch.equal(view.materialize(), ref.narrow(dim, start, length)), (dim, start)
    for piece, want in zip(lazy.chunk(2, dim=1), ref.chunk(2, dim=1)):
        assert torch.equal(piece[1:, :, 7:40].materialize(), want[1:, :, 7:40])
    out = torch.empty(2, 13, 45, dtype=torch.bfloat16)
    lazy.narrow(0, 1, 2).narrow(1, 25, 13).read_into(out)  # through load_param's path
    assert torch.equal(out, ref[1:, 25:38].bfloat16())
    view = parts[0][0].narrow(0, 3, 4)  # other torch functions materialise the view
    assert torch.equal(torch.mul(view, 2), parts[0][1][3:7] * 2)


def test_same_convention_as_transformers() -> None:
    """transformers' FP8 dequantization (block-aligned shapes only) agrees bit for bit."""
    fp8_integration = pytest.importorskip("transformers.integrations.finegrained_fp8")
    q, s = quantize_block(torch.randn(2, 64, 96), (32, 16))
    theirs = fp8_integration.Fp8Dequantize(None)._dequantize_one(q, s, torch.float32)
    assert torch.equal(theirs, dequantize_block(q, s, (32, 16)))


def test_dequantize_fp8_dtype_and_passthrough() -> None:
    q, s = quantize_block(torch.randn(40, 20), (16, 16))
    plain = LazyTensor.from_tensor(torch.ones(3))
    tensors = {"a.weight": LazyTensor.from_tensor(q), "n": plain}
    tensors["a.weight_scale_inv"] = LazyTensor.from_tensor(s)
    out = dequantize_fp8(tensors, (16, 16), torch.bfloat16)
    assert out["n"] is plain and set(out) == {"a.weight", "n"}
    assert out["a.weight"].dtype == torch.bfloat16
    assert torch.equal(out["a.weight"].materialize(), dequantize_block(q, s, (16, 16)).bfloat16())


# ---- tiny FP8 checkpoints ----


def _read(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_fp8_checkpoint_dequantizes_within_fp8_error(fp8_models: Any, arch: str) -> None:
    src, fp8, ref_dir = fp8_models[arch]
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": list(BLOCK),
    }
    assert checkpoint_fp8_block(fp8) == BLOCK and checkpoint_fp8_block(src) is None
    assert (fp8 / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    orig, stored, ref = _read(src), _read(fp8), _read(ref_dir)
    lazy = dequantize_fp8(loader.open_checkpoint(fp8), BLOCK)
    assert set(lazy) == set(orig) == set(ref)
    quantized = {k for k in orig if k + "_scale_inv" in stored}
    assert quantized == {k for k, t in orig.items() if is_quantized_key(k, t)}
    kept = set(orig) - quantized
    assert not any(k.endswith(("_proj.weight", "proj_with_mqa.weight")) for k in kept), kept
    if arch == "deepseek_v3":
        assert {"model.layers.1.mlp.gate.weight", "model.layers.0.mlp.down_proj.weight"} <= set(
            orig
        )
        assert "model.layers.1.mlp.gate.weight" in kept
        assert "model.layers.1.mlp.gate.e_score_correction_bias" in kept
        assert "model.layers.1.mlp.experts.5.up_proj.weight" in quantized
        assert "model.layers.2.mlp.shared_experts.down_proj.weight" in quantized
        assert "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in quantized
    assert {"lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"} <= kept
    for key, w in orig.items():
        got = lazy[key].materialize()
        assert torch.equal(got, ref[key]), key
        if key in kept:
            assert torch.equal(got, w) and stored[key].dtype == w.dtype, key
            continue
        q, s = stored[key], stored[key + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and s.dtype == torch.float32, key
        assert torch.equal(got, dequantize_block(q, s, BLOCK)), key  # bit-exact
        amax = w.abs().max()
        assert torch.isclose(s.max(), amax / 448, rtol=1e-6), key
        # e4m3: 3 mantissa bits (half-ulp error <= |x| / 16), subnormal step 2**-9 * scale
        step = dequantize_block(torch.ones_like(q), s, BLOCK) / 1024
        assert ((got - w).abs() <= (w.abs() / 16 + step) * (1 + 1e-5)).all(), key
        assert 0 < (got - w).abs().max() < amax / 16, key


@pytest.mark.parametrize("arch", ["llama", "deepseek_v3"])
def test_transformers_loads_the_dequantized_reference(fp8_models: Any, arch: str) -> None:
    src, fp8, ref_dir = fp8_models[arch]
    assert "quantization_config" not in json.loads((ref_dir / "config.json").read_text())
    ref = _read(ref_dir)
    model, info = AutoModelForCausalLM.from_pretrained(ref_dir, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    state = model.state_dict()
    for key in ("model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"):
        assert torch.equal(state[key], ref[key]), key
    ids = torch.randint(0, 400, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.eval()(ids).logits.flatten()
        want = AutoModelForCausalLM.from_pretrained(src).eval()(ids).logits.flatten()
    assert torch.nn.functional.cosine_similarity(got, want, 0) > 0.95  # fp8 error only


TP2, EP2 = (2, 1, False, None), (2, 1, True, None)


@pytest.mark.parametrize(
    "arch,layout",
    [("llama", TP2), ("deepseek_v3", TP2), ("deepseek_v3", EP2)],
    ids=["llama-tp2", "deepseek_v3-tp2", "deepseek_v3-ep2"],
)
def test_sharded_load_equals_the_reference(fp8_models: Any, arch: str, layout: tuple) -> None:
    """The loader's path (fuse gate/up, stack experts, narrow to each rank's shard, load_param)
    over dequantize_fp8 gives exactly the parameters loaded from the dequantized reference."""
    _, fp8, ref_dir = fp8_models[arch]
    for rank in range(layout[0]):
        ref = build(ref_dir, layout, rank, torch.float32)
        loader.load_weights(ref, ref_dir)
        model = build(ref_dir, layout, rank, torch.float32)  # fp8's config is refused today
        full = loader.checkpoint_to_params(
            model, dequantize_fp8(loader.open_checkpoint(fp8), checkpoint_fp8_block(fp8))
        )
        for name, p in model.named_parameters():
            load_param(p, full[name])
        for module in model.modules():
            if hasattr(module, "post_load"):
                module.post_load()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(p, ref_params[name]), f"rank {rank}: {name}"


def test_cli_entry(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    main([str(tiny_models["llama"]), str(tmp_path / "q"), "--block", "32"])
    assert checkpoint_fp8_block(tmp_path / "q") == (32, 32)
    with pytest.raises(SystemExit):  # already quantized
        main([str(tmp_path / "q"), str(tmp_path / "qq")])


# ---- refused inputs ----

_GOOD = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}


@pytest.mark.parametrize(
    "change,match",
    [
        ({"quant_method": "gptq"}, "quant_method='gptq'"),
        ({"activation_scheme": "static"}, "activation_scheme='static'"),
        ({"fmt": "e5m2"}, "fmt='e5m2'"),
        ({"scale_fmt": "ue8m0"}, "scale_fmt='ue8m0'"),
        ({"modules_to_convert": ["embed_tokens"]}, "modules_to_convert"),
        ({"kv_cache_scheme": "fp8"}, "field.*kv_cache_scheme"),
        ({"weight_block_size": None}, "weight_block_size=None"),
        ({"weight_block_size": [128]}, r"weight_block_size=\[128\]"),
        ({"weight_block_size": [0, 128]}, "weight_block_size"),
        ({"weight_block_size": [True, 2]}, "weight_block_size"),
        ({"weight_block_size": [128.0, 128]}, "weight_block_size"),
    ],
)
def test_fp8_block_size_refuses(change: dict[str, Any], match: str) -> None:
    cfg = {**_GOOD, "weight_block_size": [128, 128], **change}
    with pytest.raises(ValueError, match=match):
        fp8_block_size(cfg)


def test_fp8_block_size_accepts() -> None:
    assert fp8_block_size(None) is None and fp8_block_size({}) is None
    assert fp8_block_size({"quant_method": "fp8", "weight_block_size": [128, 64]}) == (128, 64)
    extra = {"modules_to_not_convert": ["lm_head"], "dequantize": False, "scale_fmt": "float"}
    assert fp8_block_size({**_GOOD, "weight_block_size": (32, 32), **extra}) == (32, 32)


def _lazy(t: torch.Tensor) -> LazyTensor:
    return LazyTensor.from_tensor(t)


def test_dequantize_fp8_refuses() -> None:
    q, s = quantize_block(torch.randn(50, 70), (32, 32))  # scale grid [2, 3]
    w = _lazy(q)
    with pytest.raises(ValueError, match=r"^x\.weight: .* without x\.weight_scale_inv"):
        dequantize_fp8({"x.weight": w}, (32, 32))
    with pytest.raises(ValueError, match=r"x\.weight_scale_inv: .*\(2, 2\)"):
        dequantize_fp8({"x.weight": w, "x.weight_scale_inv": _lazy(s[:, :2])}, (32, 32))
    with pytest.raises(ValueError, match=r"x\.weight_scale_inv: .*expected .*\(4, 5\)"):
        dequantize_fp8({"x.weight": w, "x.weight_scale_inv": _lazy(s)}, (16, 16))
    with pytest.raises(ValueError, match=r"x\.weight_scale_inv: torch\.float8_e4m3fn"):
        scale = _lazy(s.to(torch.float8_e4m3fn))
        dequantize_fp8({"x.weight": w, "x.weight_scale_inv": scale}, (32, 32))
    with pytest.raises(ValueError, match=r"^x\.weight: has x\.weight_scale_inv but is torch\.f"):
        dequantize_fp8({"x.weight": _lazy(q.float()), "x.weight_scale_inv": _lazy(s)}, (32, 32))
    with pytest.raises(ValueError, match=r"^y\.weight_scale_inv: no weight 'y\.weight'"):
        dequantize_fp8({"x.weight": _lazy(q.float()), "y.weight_scale_inv": _lazy(s)}, (32, 32))
