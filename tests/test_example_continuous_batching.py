"""examples/continuous_batching.py: continuous batching over PagedKVCache must generate exactly
what each request generates alone."""
import importlib.util
import pathlib
import sys

import pytest

import fastattn

EXAMPLE = pathlib.Path(__file__).parent.parent / "examples" / "continuous_batching.py"


@pytest.fixture(scope="module")
def example():
    name = "continuous_batching_example"
    spec = importlib.util.spec_from_file_location(name, EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]


def run(example, *argv):
    return example.run(example.parse_args(["--quiet", *argv]))


@pytest.mark.parametrize("seed,block_size", [(0, 16), (1, 1)])
def test_cpu_batched_matches_single_request(example, seed, block_size):
    result = run(example, "--device", "cpu", "--seed", str(seed), "--block-size", str(block_size))
    assert result["ok"] and result["mismatches"] == 0
    st = result["stats"]
    # The run really exercised what the example is about, not a degenerate schedule.
    assert result["chunked_prompts"] > 0  # long prompts prefilled over several steps
    assert st.mixed_steps > 0  # prefill chunks and decode rows in one launch
    assert st.batch_changes > 1 and st.max_batch_seqs > 1
    assert st.out_of_blocks > 0 and st.deferred_chunks > 0  # the default pool is tight on purpose
    assert result["max_logit_diff"] < 1e-3


@pytest.mark.parametrize("system,block_size", [(40, 16), (37, 1)])
def test_cpu_shared_system_prompt_runs_cascade(example, system, block_size):
    """Requests forked from a prefilled system prompt attend through cascade_attention (the
    shared pages once per step) and still generate exactly what each generates alone."""
    result = run(example, "--device", "cpu", "--seed", "4", "--system-prompt", str(system),
                 "--block-size", str(block_size))
    assert result["ok"] and result["mismatches"] == 0
    st = result["stats"]
    assert st.cascade_steps > 0 and st.mixed_steps > 0 and st.preemptions + st.deferred_chunks > 0
    assert result["max_logit_diff"] < 1e-3


def test_cpu_torch_reference_and_exit_code(example):
    assert example.main(["--quiet", "--reference", "torch", "--seed", "2", "--requests", "10"]) == 0


def test_cpu_preemption_is_recomputed_exactly(example):
    # A pool barely larger than the longest request forces preemptions (recompute).
    result = run(example, "--seed", "3", "--requests", "10", "--cache-tokens", "256")
    assert result["ok"] and result["stats"].preemptions > 0


def test_mismatch_is_detected(example, monkeypatch, capsys):
    """The check is not vacuous: a non-causal engine (chunk queries see later chunk keys)
    must make the example fail."""
    real = fastattn.flash_attn_varlen_func

    def not_causal(*args, **kwargs):
        kwargs["causal"] = False
        return real(*args, **kwargs)

    monkeypatch.setattr(fastattn, "flash_attn_varlen_func", not_causal)
    assert example.main(["--quiet", "--requests", "6"]) == 1
    assert "MISMATCH" in capsys.readouterr().out


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("block_size", [1, 16])
def test_cuda_batched_matches_single_request(example, dtype, block_size):
    result = run(example, "--device", "cuda", "--dtype", dtype, "--block-size", str(block_size),
                 "--requests", "32")
    assert result["ok"], f"{result['mismatches']} sequences differ (see the MISMATCH lines above)"
    # Near-tie flips are explained by rounding, but they must stay rare: a systematic
    # difference would flip many sequences.
    assert result["tie_flips"] <= 2, f"{result['tie_flips']} of 32 sequences diverged at near-ties"


@pytest.mark.parametrize("device", [pytest.param("cpu", id="cpu"),
                                    pytest.param("cuda", id="cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("system", [0, 40])
def test_fp8_cache_matches_single_request_fp8_cache(example, device, system):
    """--kv-cache fp8: the paged FP8 pool (quantizing appends, in-kernel decode, dequantized
    prefill pages, cascade) generates what one request generates alone over an FP8
    contiguous cache with the same scales (near-tie flips allowed, and rare)."""
    result = run(example, "--device", device, "--kv-cache", "fp8", "--system-prompt", str(system),
                 "--requests", "16")
    assert result["ok"], f"{result['mismatches']} sequences differ (see the MISMATCH lines above)"
    assert result["tie_flips"] <= 2
    assert result["same_as_16bit"] is not None and result["same_as_16bit"] > 0
