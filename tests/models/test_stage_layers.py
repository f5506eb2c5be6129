"""Pipeline stages on the model side (issue 27, groundwork): a model split into stages, run one
stage after another in one process, gives the whole model's logits, reads only its own weights
and caches only its own layers.

Equality is bitwise (torch.equal, fp32 and bf16): a stage runs exactly the ops the whole model
runs, on the same rows and shapes, with the same weights; the split only changes which module
object (and which KV pool) holds a layer. Any difference is a bug (a layer built with another's
index, its rope or window, or reading another layer's cache), not rounding.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import dpattn.models.loader as loader
from dpattn.config import RunnerConfig
from dpattn.distributed.parallel_state import Layout, ParallelState, thread_parallel_state
from dpattn.distributed.thread_backend import ThreadWorld
from dpattn.executor.forward_batch import ForwardBatch, ForwardMode
from dpattn.executor.logprobs import PromptLogprobRequest, PromptLogprobs
from dpattn.executor.model_runner import ModelRunner
from dpattn.models.stage import StageLayers, StagePartitionError, partition_layers
from dpattn.models.tiny import make_tiny_model

KV_TOKENS = 64
# Lengths 6, 3, 8: Gemma's sliding window is 4, so prompts cross it; several requests per batch.
PROMPTS = [[5, 9, 200, 31, 77, 8], [42, 7, 300], [300, 301, 302, 303, 9, 11, 12, 13]]
DECODE_STEPS = 2

# model -> splits to run (None: the even split of partition_layers, else layers per stage)
SPLITS: dict[str, list[tuple[int, list[int] | None]]] = {
    "llama": [(2, None), (3, None), (2, [1, 2])],  # 3 layers: auto [2, 1], uneven
    "qwen3_moe": [(2, None), (3, None)],  # layer 1 dense (mlp_only_layers), 0 and 2 MoE
    "gemma3": [(2, None), (3, None), (2, [3, 1])],  # 4 layers, sliding / full by index, tied
    "deepseek_v3": [(2, None), (3, None), (2, [1, 2])],  # layer 0 dense, 1-2 MoE, MLA
}
CASES = [(m, pp, part) for m, splits in SPLITS.items() for pp, part in splits]


def _case_id(case: tuple[str, int, list[int] | None]) -> str:
    model, pp, part = case
    return f"{model}-pp{pp}" + (f"-{'.'.join(map(str, part))}" if part else "")


def _make_tiny_gemma3(out: Path) -> Path:
    """tests/models/test_gemma3.py's tiny Gemma 3 (tied, sliding window 4, 4 layers)."""
    source = Path(__file__).parent / "test_gemma3.py"
    spec = importlib.util.spec_from_file_location("_stage_tiny_gemma3", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.make_tiny_gemma3(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stage-models")
    return {
        "llama": make_tiny_model("llama", root / "llama", num_hidden_layers=3),
        "qwen3_moe": make_tiny_model(
            "qwen3_moe", root / "qwen3_moe", num_hidden_layers=3, mlp_only_layers=[1]
        ),
        "gemma3": _make_tiny_gemma3(root / "gemma3"),
        "deepseek_v3": make_tiny_model("deepseek_v3", root / "deepseek_v3"),
    }


def single_rank() -> ParallelState:
    return thread_parallel_state(ThreadWorld(1), Layout(1, 1), 0)


def runner(path: Path, stage: StageLayers | None = None, **kw: Any) -> ModelRunner:
    cfg = RunnerConfig(str(path), kv_pool_tokens=KV_TOKENS, **kw)
    return ModelRunner(cfg, single_rank(), stage)


def num_layers(path: Path) -> int:
    return len(runner(path).model.layers)


# ---- running a pipeline in one process


def _alloc(runners: list[ModelRunner], n: int) -> tuple[int, torch.Tensor]:
    """A request row and n slots, taken identically from every stage's pools."""
    taken = []
    for r in runners:
        row, slots = r.req_to_token.alloc(), r.kv_pool.alloc(n)
        assert row is not None and slots is not None
        r.req_to_token.table[row, :n] = slots
        taken.append((row, slots))
    row, slots = taken[0]
    assert all(rw == row and torch.equal(s, slots) for rw, s in taken)
    return row, slots


def _run(
    runners: list[ModelRunner], batch: ForwardBatch
) -> tuple[torch.Tensor, PromptLogprobs | None]:
    """The stages one after another: each passes its rows to the next, the last gives logits."""
    hidden = None
    for r in runners[:-1]:
        hidden = r.forward_hidden(batch, hidden)
        assert hidden.shape == (batch.num_tokens, r.hf_config.hidden_size)
    return runners[-1].forward_with_logprobs(batch, hidden=hidden)


def run_pipeline(
    runners: list[ModelRunner],
) -> tuple[list[torch.Tensor], PromptLogprobs | None, list[torch.Tensor]]:
    """Prefill of PROMPTS in one batch (with prompt logprobs), then DECODE_STEPS greedy decode
    steps: each step's logits, the prompt logprobs, and each request's KV slots."""
    total = [len(p) + DECODE_STEPS for p in PROMPTS]
    rows, slots = zip(*(_alloc(runners, n) for n in total))
    ids = [t for p in PROMPTS for t in p]
    lens = [len(p) for p in PROMPTS]
    # every prompt position but each request's last predicts the next prompt token
    logprob_rows = [sum(lens[:i]) + j for i, n in enumerate(lens) for j in range(n - 1)]
    targets = [p[j + 1] for p in PROMPTS for j in range(len(p) - 1)]
    batch = ForwardBatch(
        ForwardMode.EXTEND,
        torch.tensor(ids),
        torch.cat([torch.arange(n) for n in lens]),
        torch.cat([s[:n] for s, n in zip(slots, lens)]),
        list(rows),
        lens,
        lens,
        prompt_logprobs=PromptLogprobRequest(
            torch.tensor(logprob_rows), torch.tensor(targets), [n - 1 for n in lens], 3
        ),
    )
    logits, prompt = _run(runners, batch)
    steps = [logits]
    for step in range(DECODE_STEPS):
        pos = [n + step for n in lens]
        batch = ForwardBatch(
            ForwardMode.DECODE,
            logits.argmax(-1),
            torch.tensor(pos),
            torch.stack([s[p] for s, p in zip(slots, pos)]),
            list(rows),
            [p + 1 for p in pos],
            [1] * len(pos),
        )
        logits = _run(runners, batch)[0]
        steps.append(logits)
    return steps, prompt, list(slots)


def stage_runners(path: Path, pp: int, part: list[int] | None, **kw: Any) -> list[ModelRunner]:
    return [runner(path, st, **kw) for st in partition_layers(num_layers(path), pp, part)]


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_stages_equal_whole_model(models: dict[str, Path], case: tuple) -> None:
    name, pp, part = case
    path = models[name]
    whole = runner(path)
    want, want_prompt, slots = run_pipeline([whole])
    stages = stage_runners(path, pp, part)
    got, got_prompt, _ = run_pipeline(stages)
    for step, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(g, w), f"step {step}: max diff {(g - w).abs().max()}"
    assert got_prompt is not None and got_prompt == want_prompt
    # each stage's pool holds exactly the whole model's cache of its layers
    used = torch.cat(slots)
    for r in stages:
        assert len(r.kv_pool.k) == r.stage.num_layers
        for j in range(r.stage.num_layers):
            for mine, ref in zip(
                r.kv_pool.layer_buffers(j), whole.kv_pool.layer_buffers(r.stage.start + j)
            ):
                assert torch.equal(mine[used], ref[used]), f"stage layer {j}"


def test_stages_equal_whole_model_bf16(models: dict[str, Path]) -> None:
    """The rows between stages keep the model dtype: bf16 stages are bitwise the whole too."""
    path = models["deepseek_v3"]
    want = run_pipeline([runner(path, dtype="bfloat16")])[0]
    got = run_pipeline(stage_runners(path, 2, None, dtype="bfloat16"))[0]
    assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- what a stage holds


_LAYER_KEY = re.compile(r"\blayers\.(\d+)\.")


def stage_keys(path: Path, stage: StageLayers, tied: bool) -> set[str]:
    """The checkpoint keys a stage must read: its layers' and its ends'."""
    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            keys.update(fh.keys())  # noqa: SIM118 - safe_open is not a mapping
    out = set()
    for key in keys:
        m = _LAYER_KEY.search(key)
        if m:
            keep = stage.start <= int(m[1]) < stage.end
        elif key.endswith("embed_tokens.weight"):
            keep = stage.first or (stage.last and tied)
        else:  # the final norm, an untied LM head
            assert key.endswith(("model.norm.weight", "lm_head.weight")), key
            keep = stage.last
        if keep:
            out.add(key)
    return out


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_stage_reads_and_holds_only_its_layers(
    monkeypatch: pytest.MonkeyPatch, models: dict[str, Path], case: tuple
) -> None:
    name, pp, part = case
    path = models[name]
    # plain weights: prepacking moves projections out of the state dict compared below
    whole = runner(path, disable_weight_prepack=True)
    full_state = whole.model.state_dict()
    read: set[str] = set()
    original = loader.SafetensorsSource.read

    def counting_read(self: Any, index: Any, ctx: Any) -> torch.Tensor:
        read.add(self.key)
        return original(self, index, ctx)

    monkeypatch.setattr(loader.SafetensorsSource, "read", counting_read)
    total = len(whole.model.layers)
    for stage in partition_layers(total, pp, part):
        read.clear()
        r = runner(path, stage, disable_weight_prepack=True)
        assert read == stage_keys(path, stage, r.model.tie_word_embeddings)
        state = r.model.state_dict()
        layers = {int(m[1]) for k in state if (m := _LAYER_KEY.match(k))}
        assert layers == set(range(stage.start, stage.end))
        assert ("embed_tokens.weight" in state) == stage.first
        assert ("norm.weight" in state) == stage.last
        # same global names, same values: every layer is the whole model's layer of that index
        for key, t in state.items():
            ref = full_state[key if key in full_state else "embed_tokens.weight"]
            assert torch.equal(t, ref), key
        for j, layer in enumerate(r.model.layers):
            ref_layer = whole.model.layers[stage.start + j]
            assert layer.self_attn.cache_layer == j
            assert layer.self_attn.sliding_window == ref_layer.self_attn.sliding_window
            assert type(layer.mlp) is type(ref_layer.mlp)
        # the KV pool and its budget count this stage's layers only
        assert len(r.kv_pool.k) == stage.num_layers
        share = r.kv_budget.bytes_per_token * total
        assert share == whole.kv_budget.bytes_per_token * stage.num_layers


def test_layer_index_decides_per_layer_behaviour(models: dict[str, Path]) -> None:
    """Spelled out for the three models whose layers differ by index (the equality test above
    would also catch a mix-up, less legibly)."""
    gemma = runner(models["gemma3"], StageLayers(2, 4, False, True)).model
    assert [layer.self_attn.sliding_window for layer in gemma.layers] == [None, 4]  # full, local
    deepseek = runner(models["deepseek_v3"], StageLayers(0, 1, True, False)).model
    assert [layer.moe for layer in deepseek.layers] == [False]  # first_k_dense_replace = 1
    qwen = runner(models["qwen3_moe"], StageLayers(1, 3, False, True)).model
    assert [layer.moe for layer in qwen.layers] == [False, True]  # mlp_only_layers = [1]


def test_stage_forward_misuse_is_named(models: dict[str, Path]) -> None:
    path = models["llama"]
    first, last = (runner(path, st) for st in partition_layers(3, 2))
    row, slots = _alloc([first, last], 3)
    batch = ForwardBatch(
        ForwardMode.EXTEND, torch.tensor([5, 6, 7]), torch.arange(3), slots, [row], [3], [3]
    )
    with pytest.raises(ValueError, match=r"layers \[0, 2\) ends before the LM head"):
        first.forward(batch)
    with pytest.raises(ValueError, match="embeds the batch's ids"):
        first.forward_hidden(batch, torch.zeros(3, 64))
    with pytest.raises(ValueError, match="ends in the LM head"):
        last.forward_hidden(batch)
    with pytest.raises(ValueError, match=r"needs the previous stage's rows \(3, 64\), got None"):
        last.forward(batch)
    with pytest.raises(ValueError, match=r"got \(2, 64\)"):
        last.forward(batch, hidden=torch.zeros(2, 64))
    with pytest.raises(ValueError, match="does not fit the model's 3 decoder layers"):
        runner(path, StageLayers(1, 2, False, True))


# ---- the partition


@pytest.mark.parametrize(
    "layers,pp,sizes",
    [(3, 1, [3]), (2, 2, [1, 1]), (3, 2, [2, 1]), (3, 3, [1, 1, 1]), (4, 3, [1, 2, 1])]
    + [(5, 3, [2, 2, 1]), (20, 4, [5, 5, 5, 5]), (22, 4, [5, 6, 6, 5])],
)
def test_even_partition(layers: int, pp: int, sizes: list[int]) -> None:
    """vLLM's get_pp_indices (SGLang's split): the remainder goes before the last stage."""
    stages = partition_layers(layers, pp)
    assert [s.num_layers for s in stages] == sizes
    assert [s.start for s in stages] == [sum(sizes[:i]) for i in range(pp)]
    assert [(s.first, s.last) for s in stages] == [(i == 0, i == pp - 1) for i in range(pp)]
    assert partition_layers(layers, pp, sizes) == stages


@pytest.mark.parametrize(
    "layers,pp,part,match",
    [
        (2, 3, None, "--pp-size 3 is larger than the model's 2 decoder layers"),
        (3, 0, None, "--pp-size must be at least 1"),
        (4, 2, [1, 2], r"sums to 3, but the model has 4 decoder layers"),
        (4, 2, [4, 0], "at least one layer"),
        (4, 2, [1, 1, 2], r"has 3 entries; --pp-size 2 needs 2"),
    ],
)
def test_bad_partition_is_one_line(
    layers: int, pp: int, part: list[int] | None, match: str
) -> None:
    with pytest.raises(StagePartitionError, match=match) as err:
        partition_layers(layers, pp, part)
    assert "\n" not in str(err.value)


def test_stage_layers_checks() -> None:
    assert StageLayers.whole(4) == StageLayers(0, 4, True, True)
    assert StageLayers(2, 4, False, True).cache_layer(3) == 1
    with pytest.raises(ValueError, match="at least one layer"):
        StageLayers(2, 2, False, True)
    with pytest.raises(ValueError, match="starts at layer 0"):
        StageLayers(1, 2, True, False)
    with pytest.raises(ValueError, match="not in stage"):
        StageLayers(2, 4, False, True).cache_layer(1)
