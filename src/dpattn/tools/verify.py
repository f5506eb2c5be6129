"""Layout verifier: run a DP-attention layout and compare its logits with HF transformers.

Prompts of mixed lengths are spread unevenly over the DP groups (the last group gets none
when D > 1), some arrive one step late so extend and decode mix across groups, and every
rank's logits at every step are compared with a transformers forward over the same tokens.
With pipeline stages (--pp-size) each step goes through the stages, and the last stage's
ranks' logits are compared (verify_stages.py).
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import asdict, dataclass
from typing import Any

import torch

from dpattn.config import RunnerConfig, resolve_backend, resolve_device
from dpattn.distributed.parallel_state import Layout, ParallelState
from dpattn.executor.forward_batch import ForwardBatch, ForwardMode
from dpattn.executor.model_runner import DTYPES, ModelRunner
from dpattn.models.quantized import reference_weights, resolve_quantization
from dpattn.models.registry import model_stages
from dpattn.runtime.launch import run_ranks
from dpattn.scheduler.mlp_sync import SyncRow, decide, gather_rows
from dpattn.tools.logit_compare import RowCheck, Tolerance, check_row, default_tolerance
from dpattn.tools.verify_stages import last_stage_results, stage_forward


@dataclass
class VerifyConfig:
    model_path: str
    tp: int = 1
    dp: int = 1
    pp: int = 1  # pipeline stages, each a (tp, dp) layout of its own
    pp_layer_partition: list[int] | None = None  # layers per stage (None: the even split)
    ep: bool = False
    moe_dense_tp_size: int | None = None
    dp_padding_mode: str = "auto"
    mla_mode: str = "auto"
    dtype: str = "float32"
    quantization: str | None = None  # None: the checkpoint's own
    quant_group_size: int = 128
    quant_batch_path: str = "dequantize"
    backend: str | None = None  # None: nccl on cuda, gloo on cpu (config.resolve_backend)
    device: str | None = None  # None: cuda when available (config.resolve_device)
    num_prompts: int = 5
    decode_steps: int = 4
    seed: int = 0
    atol: float | None = None  # None: logit_compare.default_tolerance(dtype)
    rtol: float | None = None
    max_kl: float | None = None
    reference_model_path: str | None = None
    idle_group: bool = True  # D > 1: the last DP group gets no request at all


@dataclass
class Request:
    rid: int
    tokens: list[int]
    arrival: int
    dp_rank: int
    kv_len: int = 0
    row: int = -1
    slots: torch.Tensor | None = None
    decode_steps: int = 0
    logits: int = 0  # logits produced so far


def make_requests(cfg: VerifyConfig, vocab: int) -> list[Request]:
    rng = random.Random(cfg.seed)
    busy = max(1, cfg.dp - 1) if cfg.idle_group else cfg.dp
    reqs = []
    for i in range(cfg.num_prompts):
        length = rng.choice([1, 2, 3, 5, 7, 11, 16])
        group = 0 if i < (cfg.num_prompts + 1) // 2 else i % busy  # uneven: group 0 gets most
        tokens = [rng.randrange(3, vocab) for _ in range(length)]
        reqs.append(Request(i, tokens, arrival=i % 2, dp_rank=group, decode_steps=cfg.decode_steps))
    return reqs


def _build_batch(reqs: list[Request], step: int) -> ForwardBatch:
    active = [r for r in reqs if r.arrival <= step and r.logits <= r.decode_steps]
    if not active:
        return ForwardBatch.idle()
    ids, pos, loc, ext = [], [], [], []
    for r in active:
        new = r.tokens[r.kv_len :]
        ids += new
        pos += range(r.kv_len, len(r.tokens))
        loc.append(r.slots[r.kv_len : len(r.tokens)])
        ext.append(len(new))
    modes = {e > 1 or r.kv_len == 0 for e, r in zip(ext, active)}
    mode = (
        ForwardMode.MIXED
        if len(modes) == 2
        else ForwardMode.EXTEND
        if True in modes
        else ForwardMode.DECODE
    )
    return ForwardBatch(
        mode,
        torch.tensor(ids),
        torch.tensor(pos),
        torch.cat(loc),
        [r.row for r in active],
        [len(r.tokens) for r in active],
        ext,
    )


def rank_main(ps: ParallelState, cfg: VerifyConfig) -> dict[str, Any]:
    runner = ModelRunner(
        RunnerConfig(
            cfg.model_path,
            cfg.dtype,
            cfg.ep,
            cfg.moe_dense_tp_size,
            cfg.dp_padding_mode,
            mla_mode=cfg.mla_mode,
            quantization=cfg.quantization,
            quant_group_size=cfg.quant_group_size,
            quant_batch_path=cfg.quant_batch_path,
            pp_layer_partition=cfg.pp_layer_partition,
            disable_cuda_graph=True,  # no scheduler, no graph vote: every step runs eagerly
        ),
        ps,
    )
    kv_free0, rows_free0 = runner.kv_pool.available_size(), runner.req_to_token.available_size()
    reqs = [r for r in make_requests(cfg, runner.hf_config.vocab_size) if r.dp_rank == ps.dp_rank]
    for r in reqs:
        r.row = runner.req_to_token.alloc()
        r.slots = runner.kv_pool.alloc(len(r.tokens) + cfg.decode_steps)
        runner.req_to_token.table[r.row, : r.slots.numel()] = r.slots
    out: dict[int, list[list[float]]] = {r.rid: [] for r in reqs}
    row_steps: dict[int, list[int]] = {r.rid: [] for r in reqs}  # the step of each logits row
    steps = []
    for step in range(cfg.decode_steps + 2):
        batch = _build_batch(reqs, step)
        # The MLP sync's own transport and decision (the verifier has no scheduler).
        row = SyncRow(batch.num_tokens, is_extend=batch.forward_mode.is_extend_like())
        skip = ps.dp_size == 1
        decision = decide([row] if skip else gather_rows(ps, row), ps.dp_size, skip)
        if not decision.run_forward:
            continue
        batch.global_num_tokens = decision.global_num_tokens
        batch.is_extend_in_batch = decision.is_extend_in_batch
        plan = runner.gather_plan(batch)
        logits, next_ids = stage_forward(runner, ps, batch, plan, step)  # None: not the last
        active = [r for r in reqs if r.arrival <= step and r.logits <= cfg.decode_steps]
        for i, (r, next_id) in enumerate(zip(active, next_ids, strict=True)):
            r.kv_len = len(r.tokens)
            r.logits += 1
            if logits is not None:
                out[r.rid].append(logits[i].tolist())
                row_steps[r.rid].append(step)
            if r.logits <= cfg.decode_steps:
                r.tokens.append(next_id)
        steps.append(
            {
                "step": step,
                "global_num_tokens": batch.global_num_tokens,
                "mode": plan.mode.value,
                "buffer": plan.total,
            }
        )
    if ps.pp is not None:
        ps.pp.flush()  # the sends this rank queued have arrived before it exits
    for r in reqs:
        runner.kv_pool.free(r.slots)
        runner.req_to_token.free(r.row)
    leaked = (
        kv_free0 - runner.kv_pool.available_size(),
        rows_free0 - runner.req_to_token.available_size(),
    )
    return {
        "tokens": {r.rid: r.tokens for r in reqs},
        "logits": out,
        "row_steps": row_steps,
        "steps": steps,
        "leaked": leaked,
        "stage": [runner.stage.start, runner.stage.end],  # decoder layers [start, end)
    }


def reference_logits(
    model_path: str,
    dtype: str,
    sequences: dict[int, list[int]],
    device: str = "cpu",
    quantization: str = "none",
    group_size: int = 128,
) -> dict[int, torch.Tensor]:
    """transformers' logits for each sequence, on `device` (the layout's own), returned on CPU.
    `quantization`: with the dense weights dpattn's kernels compute with (models/quantized.py),
    so that the quantized arithmetic, not the quantization, is what verify measures."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=DTYPES[dtype])
    reference_weights(model, model_path, quantization, group_size)
    model = model.to(device).eval()
    with torch.inference_mode():
        return {
            rid: model(torch.tensor([seq], device=device)).logits[0].float().cpu()
            for rid, seq in sequences.items()
        }


def kernel_dtype(cfg: VerifyConfig) -> str:
    """The activation dtype the projections compute in: the int4 kernel's bf16 for the integer
    formats on CPU (layers/quant.py), else the model dtype."""
    return "bfloat16" if runs_int4_kernel(cfg) else cfg.dtype


def runs_int4_kernel(cfg: VerifyConfig) -> bool:
    """The integer formats run torch's int4 kernel on CPU; on a GPU they run dense."""
    return cfg.quantization in ("gguf", "int8", "int4") and cfg.device in (None, "cpu")


def tolerance(cfg: VerifyConfig) -> Tolerance:
    """The kernels' dtype's default tolerance (bf16 kernels in an fp32 model: against fp32),
    with the fields the config sets overridden."""
    kernel = kernel_dtype(cfg)
    mixed = kernel == "bfloat16" and cfg.dtype == "float32"
    d = default_tolerance("bfloat16-vs-float32" if mixed else kernel)
    return Tolerance(
        d.atol if cfg.atol is None else cfg.atol,
        d.rtol if cfg.rtol is None else cfg.rtol,
        d.max_kl if cfg.max_kl is None else cfg.max_kl,
    )


def verify(cfg: VerifyConfig) -> dict[str, Any]:
    if cfg.num_prompts < 1:
        raise ValueError("verify needs at least one prompt")
    layout = Layout(cfg.tp, cfg.dp, cfg.pp)
    if cfg.pp > 1 or cfg.pp_layer_partition is not None:  # before any rank starts: one line
        model_stages(cfg.model_path, cfg.pp, cfg.pp_layer_partition)
    cfg.device = resolve_device(cfg.device)
    cfg.backend = resolve_backend(cfg.backend, cfg.device)
    cfg.quantization = resolve_quantization(cfg.model_path, cfg.quantization)
    tol = tolerance(cfg)
    results = run_ranks(
        functools.partial(rank_main, cfg=cfg), layout, cfg.backend, device=cfg.device
    )
    # Ranks of one DP group (every stage) must agree exactly; then compare the leaders of the
    # last stage, which computed the logits, with the reference.
    last = last_stage_results(results, layout)
    merged_tokens: dict[int, list[int]] = {}
    merged_logits: dict[int, list[list[float]]] = {}
    merged_steps: dict[int, list[int]] = {}
    for res in last[:: layout.attn_tp_size]:
        merged_tokens.update(res["tokens"])
        merged_logits.update(res["logits"])
        merged_steps.update(res["row_steps"])
    ref_path = cfg.reference_model_path or cfg.model_path
    quant = cfg.quantization if ref_path == cfg.model_path else "none"
    if quant == "gguf" and not runs_int4_kernel(cfg):
        quant = "none"  # no int4 kernel on the device: a GGUF model runs its exact values
    ref = reference_logits(
        ref_path, cfg.dtype, merged_tokens, cfg.device, quant, cfg.quant_group_size
    )
    per_request: dict[int, dict[str, Any]] = {}
    by_step: dict[int, list[RowCheck]] = {}
    for rid, rows in merged_logits.items():
        prompt_len = len(merged_tokens[rid]) - cfg.decode_steps
        checks = [
            check_row(torch.tensor(row), ref[rid][prompt_len - 1 + i], tol)
            for i, row in enumerate(rows)
        ]
        for step, c in zip(merged_steps[rid], checks):
            by_step.setdefault(step, []).append(c)
        per_request[rid] = {
            "prompt_len": prompt_len,
            "max_abs_diff": max(c.max_abs_diff for c in checks),
            "greedy_agree": all(c.greedy_agree for c in checks),
        }
    checks = [c for cs in by_step.values() for c in cs]
    max_kl = max((c.kl for c in checks), default=0.0)
    complete = bool(merged_logits) and all(
        len(rows) == cfg.decode_steps + 1 for rows in merged_logits.values()
    )
    ok_logits = all(c.ok for c in checks) and max_kl <= tol.max_kl
    quant_error = None
    if quant not in ("none", "fp8"):  # what the quantization itself costs, for the user to see
        plain = reference_logits(ref_path, cfg.dtype, merged_tokens, cfg.device)
        quant_error = _quantization_error(merged_logits, merged_tokens, plain, cfg.decode_steps)
    return {
        "ok": complete and ok_logits and all(res["leaked"] == (0, 0) for res in results),
        "model": cfg.model_path,
        "reference_model": cfg.reference_model_path or cfg.model_path,
        "dtype": cfg.dtype,
        "max_abs_logit_diff": max((c.max_abs_diff for c in checks), default=0.0),
        "max_bound": max((c.bound for c in checks), default=tol.atol),
        "greedy_agreement": sum(c.greedy_agree for c in checks) / max(1, len(checks)),
        "max_kl": max_kl,
        "atol": tol.atol,
        "rtol": tol.rtol,
        "kl_tolerance": tol.max_kl,
        "tolerance_rule": "|Δlogit| <= atol + rtol * max|reference logit| per row; greedy "
        "tokens agree unless the reference's top two are within that bound; KL <= kl_tolerance",
        "layout": {
            "tp": cfg.tp,
            "dp": cfg.dp,
            "attn_tp": layout.attn_tp_size,
            "ep": cfg.ep,
            "pp": cfg.pp,
            "stages": [res["stage"] for res in results[:: layout.tp_size]],
        },
        "config": asdict(cfg),
        "requests": per_request,
        "steps": results[0]["steps"],
        # every group's rows at each step: the checks of a step that issued them
        "step_checks": [{"step": k, **_summary(cs)} for k, cs in sorted(by_step.items())],
        "kv_leaked": [res["leaked"] for res in results],  # every rank, global order
        "quantization": cfg.quantization,
        "kernel_dtype": kernel_dtype(cfg),
        "quantization_error": quant_error,
    }


def _quantization_error(
    logits: dict[int, list[list[float]]],
    tokens: dict[int, list[int]],
    plain: dict[int, torch.Tensor],
    decode_steps: int,
) -> dict[str, float]:
    """This run's logits against the unquantized checkpoint's (transformers, same tokens): the
    KL of the next-token distributions and how often the greedy tokens agree."""
    kls, agree = [], []
    for rid, rows in logits.items():
        start = len(tokens[rid]) - decode_steps - 1
        for i, row in enumerate(rows):
            c = check_row(torch.tensor(row), plain[rid][start + i], Tolerance(0.0, 0.0, 0.0))
            kls.append(c.kl)
            agree.append(c.greedy_agree)
    return {
        "kl_mean": sum(kls) / len(kls),
        "kl_max": max(kls),
        "greedy_agreement": sum(agree) / len(agree),
        "rows": len(kls),
    }


def _summary(checks: list[RowCheck]) -> dict[str, Any]:
    return {
        "max_abs_diff": max(c.max_abs_diff for c in checks),
        "bound": min(c.bound for c in checks),
        "greedy_agree": sum(c.greedy_agree for c in checks),
        "rows": len(checks),
        "max_kl": max(c.kl for c in checks),
    }


def print_report(report: dict[str, Any]) -> None:
    print(json.dumps(report))
