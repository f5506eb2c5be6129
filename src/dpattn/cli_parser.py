"""The `dpattn` command line's flags: the argument parser of every subcommand. The config
fields' flags come from dpattn.config (each defined there, once); cli.py runs the commands."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from dpattn.config import ENGINE, LAYOUT, flag_fields
from dpattn.logs import LOG_LEVELS
from dpattn.models.tiny import TINY_ARCHS, add_size_overrides


def _add_config_flags(p: argparse.ArgumentParser, *groups: str) -> None:
    """The config fields' flags (dpattn.config): each flag is defined there, once."""
    p.add_argument("--model-path", help="HF-format model directory (default: see README)")
    for group in groups:
        for f in flag_fields(group):
            meta = f.metadata
            names = meta["flags"] or (f"--{f.name.replace('_', '-')}",)
            names = (*names, f"--{f.name.replace('_', '-')}") if meta["flags"] else names
            kw: dict[str, Any] = {"dest": f.name, "default": f.default, "help": meta["help"]}
            if f.type in ("bool", bool):
                kw["action"] = "store_true"
            else:
                kw["type"] = type(meta["choices"][0]) if meta["choices"] else _flag_type(f)
                kw["choices"] = meta["choices"]
            p.add_argument(*dict.fromkeys(names), **kw)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("dpattn")
    except PackageNotFoundError:
        return "unknown"


def _flag_type(f: dataclasses.Field[Any]) -> Callable[[str], Any]:
    kind = str(f.type).split("|")[0].strip()
    return {"int": int, "float": float, "list[int]": int_list}.get(kind, str)


def int_list(text: str) -> list[int]:
    """A comma-separated list of integers (`--pp-layer-partition 3,2,2`)."""
    try:
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of integers"
        ) from None


def engine_options(args: argparse.Namespace, *groups: str) -> dict[str, Any]:
    """Engine kwargs (config field names) from the flags of _add_config_flags."""
    groups = groups or (LAYOUT, ENGINE)
    options = {f.name: getattr(args, f.name) for g in groups for f in flag_fields(g)}
    return {**options, "log_level": args.log_level}  # the ranks log at the CLI's level


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpattn", description="LLM inference with data-parallel attention"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    # Every subcommand takes --log-level (after its name, like its other flags).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default="info",
        choices=LOG_LEVELS,
        help="for the whole program, rank processes included (debug: tracebacks on errors)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    tiny = sub.add_parser(
        "make-tiny-model",
        parents=[common],
        help="write a tiny random HF-format checkpoint + tokenizer",
    )
    tiny.add_argument("--arch", choices=TINY_ARCHS, required=True)
    tiny.add_argument("--out", required=True)
    tiny.add_argument("--seed", type=int, default=0)
    layout = tiny.add_mutually_exclusive_group()
    layout.add_argument(
        "--per-expert-keys",
        dest="fused_experts",
        action="store_const",
        const=False,
        help="legacy per-expert MoE keys (default for deepseek_v2/deepseek_v3, as on the hub)",
    )
    layout.add_argument(
        "--fused-experts",
        dest="fused_experts",
        action="store_const",
        const=True,
        help="transformers 5's fused experts.gate_up_proj/down_proj (default for the other archs)",
    )
    tiny.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    tiny.add_argument(
        "--mtp-layers",
        "--num-nextn-predict-layers",
        dest="mtp_layers",
        type=int,
        default=0,
        metavar="N",
        help="deepseek_v3: append N fake multi-token-prediction layers (as the hub checkpoints)",
    )
    add_size_overrides(tiny)

    verify = sub.add_parser(
        "verify", parents=[common], help="check a parallel layout's logits against HF transformers"
    )
    _add_config_flags(verify, LAYOUT)
    verify.add_argument(
        "--reference-model-path", help="compare against another checkpoint (must then fail)"
    )
    verify.add_argument("--num-prompts", type=int, default=5)
    verify.add_argument("--decode-steps", type=int, default=4)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument(
        "--no-idle-group",
        dest="idle_group",
        action="store_false",
        help="give every DP group requests",
    )
    verify.add_argument(
        "--atol",
        "--tolerance",
        type=float,
        default=None,
        help="|Δlogit| <= atol + rtol * max|logit| (default atol 1e-4 fp32, 0.25 bf16)",
    )
    verify.add_argument("--rtol", type=float, default=None, help="default 5e-5 fp32, 1/32 bf16")
    verify.add_argument(
        "--max-kl", type=float, default=None, help="next-token KL bound (1e-6 fp32, 0.05 bf16)"
    )

    gen = sub.add_parser("generate", parents=[common], help="generate text for one or more prompts")
    _add_config_flags(gen, LAYOUT, ENGINE)
    gen.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    gen.add_argument("--input-ids", help="comma-separated token ids instead of a prompt")
    gen.add_argument("--max-new-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=-1)
    gen.add_argument("--min-p", type=float, default=0.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="print the full result as JSON")

    bench = sub.add_parser("bench", parents=[common], help="offline benchmark through the Engine")
    _add_config_flags(bench, LAYOUT, ENGINE)
    # --tp and the lengths' defaults depend on the mode (_bench_defaults)
    bench.set_defaults(tp_size=None)
    bench.add_argument("--num-prompts", type=int, default=64)
    bench.add_argument("--input-len", type=int, help="default 32 (--compare-dp-attention: 192)")
    bench.add_argument("--output-len", type=int, help="default 16 (--compare-dp-attention: 32)")
    bench.add_argument(
        "--range-ratio", type=float, default=1.0, help="lengths uniform in [ratio*len, len]"
    )
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument(
        "--output",
        "--json-out",
        help="write the JSON report here (also printed, except online: a table there)",
    )
    bench.add_argument(
        "--compare-transformers",
        action="store_true",
        help="also time greedy generation at batch 1, 16 and 64, fp32 and bf16, against "
        "transformers' generate on the same prompts",
    )
    bench.add_argument(
        "--compare-llamacpp",
        action="store_true",
        help="greedy generation at batch 1, 16 and 64 against llama.cpp (llama-cpp-python, built "
        "once into the cache) on the default model's GGUF, same prompts and thread count; "
        "--compare-repeats rounds each",
    )
    bench.add_argument(
        "--compare-repeats",
        type=int,
        default=3,
        help="--compare-transformers: timed runs of each side per batch size; "
        "--constrained-share: rounds over the shares, in alternating order (medians reported)",
    )
    bench.add_argument(
        "--constrained-share",
        type=float,
        nargs="+",
        metavar="SHARE",
        help="fractions of the requests that generate under a JSON schema (e.g. 0 0.5 1): each "
        "share runs on the same prompts, side by side in one run; throughput, step time and "
        "the grammar masks' cost per share",
    )
    bench.add_argument(
        "--compare-prefix-cache",
        action="store_true",
        help="prefix cache on vs off: --num-prompts requests sharing a --shared-prefix-len "
        "token system prompt, --input-len token questions; prefill throughput of each",
    )
    bench.add_argument(
        "--compare-routing",
        action="store_true",
        help="cache_aware vs round_robin DP routing: --num-prompts conversations of "
        "--num-turns turns (first turn --shared-prefix-len tokens, then --input-len per turn)",
    )
    bench.add_argument(
        "--compare-dp-attention",
        action="store_true",
        help="DP attention (--tp T --dp T) vs TP attention (--tp T --dp 1), T = --tp (default "
        "4), at the same KV memory per rank: --max-total-tokens slots of the DP layout "
        "(default 1024), --kv-bytes-per-rank or --mem-fraction-static; --num-prompts "
        "distinct prompts of --input-len tokens, --output-len new tokens each",
    )
    bench.add_argument(
        "--kv-bytes-per-rank",
        type=int,
        help="--compare-dp-attention: KV cache bytes per rank, the same for both layouts",
    )
    bench.add_argument("--shared-prefix-len", type=int, default=1024)
    bench.add_argument("--num-turns", type=int, default=4)
    bench.add_argument(
        "--base-url", help="online mode: benchmark a running server (http://HOST:PORT)"
    )
    bench.add_argument("--request-rate", type=float, help="online: Poisson arrivals per second")
    bench.add_argument("--concurrency", type=int, help="online: cap on requests in flight")
    bench.add_argument("--plot", help="online: write a PNG of latency percentiles and throughput")
    serve = sub.add_parser(
        "serve", parents=[common], help="OpenAI-compatible HTTP server (SSE, /metrics)"
    )
    _add_config_flags(serve, LAYOUT, ENGINE)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=30000)
    serve.add_argument(
        "--max-queued-requests",
        type=int,
        default=256,
        help="requests that may wait beyond what the DP groups run at once; more get HTTP 429"
        " (-1: unbounded)",
    )
    serve.add_argument("--served-model-name", help="model id in the API (default: dir name)")
    serve.add_argument(
        "--chat-template",
        help="chat template: a built-in name (gemma) or a Jinja file; default: the tokenizer's "
        "own, or Gemma's turn format for the packaged Gemma 3 270M (a base model)",
    )
    serve.add_argument("--access-log", action="store_true", help="log every HTTP request")
    serve.add_argument(
        "--request-timeout", type=float, help="seconds a request may run; then aborted, HTTP 504"
    )
    serve.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (not on /health)")
    serve.add_argument(
        "--max-request-body-bytes", type=int, default=16 * 2**20, help="larger bodies: HTTP 413"
    )
    serve.add_argument(
        "--keep-alive-on-engine-death",
        action="store_true",
        help="keep serving 503 after a rank died instead of exiting non-zero",
    )
    router = sub.add_parser(
        "router", parents=[common], help="PD router in front of prefill and decode servers"
    )
    router.add_argument(
        "--pd-disaggregation", action="store_true", help="prefill/decode disaggregation (required)"
    )
    router.add_argument(
        "--prefill",
        nargs="+",
        action="append",
        default=[],
        metavar="URL [BOOTSTRAP_PORT]",
        help="a prefill server and its bootstrap port (default 8998); repeatable",
    )
    router.add_argument("--decode", action="append", default=[], help="a decode server; repeatable")
    router.add_argument("--host", default="127.0.0.1")
    router.add_argument("--port", type=int, default=8000)
    return parser
