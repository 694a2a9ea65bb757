"""What of the GPU paths runs without a GPU: random benchmark weights, quantization settings, device settings and
whether a span fits its GPU, the static KV cache that CUDA-graph sessions use, and which sessions get it. The
graphs themselves are checked on a GPU by perf/gpu_bench.py (greedy tokens of the graph path equal to eager
ones)."""
from __future__ import annotations

import builtins
import subprocess
import sys

import pytest
import torch
from transformers import DynamicCache, LlamaConfig

from corolla.client.config import ClientConfig
from corolla.client.families import DistributedLlamaForCausalLM
from corolla.worker.batching import joinable
from corolla.worker.config import ConfigError, WorkerConfig
from corolla.worker.cuda_graph import GraphDecoder, StaticSpanCache
from corolla.worker.launcher import LocalSwarm
from corolla.worker.memory import check_fits, span_bytes
from corolla.worker.quantize import quantize_linears, weight_bytes
from corolla.worker.random_weights import RANDOM_STD, random_span
from tests.conftest import worker_args

HIDDEN = 64


def tiny_config(**overrides) -> LlamaConfig:
    return LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, **overrides)


def test_random_weights_are_normal_and_never_zero():
    span = random_span(tiny_config(), 1, 3, torch.float32, "cpu", seed=5)
    matrices = torch.cat([p.flatten() for p in span.parameters() if p.dim() == 2])
    scales = torch.cat([p.flatten() for name, p in span.named_parameters() if "norm" in name])
    assert abs(matrices.std().item() - RANDOM_STD) < 1e-3 and abs(matrices.mean().item()) < 1e-3
    assert abs(scales.mean().item() - 1) < 1e-2  # norm scales around 1: activations keep their size
    assert (matrices != 0).all() and not any(p.is_meta for p in span.parameters())
    assert not any(p.requires_grad for p in span.parameters())


def test_random_weights_depend_on_seed_and_block_only():
    a = random_span(tiny_config(), 0, 3, torch.float32, "cpu", seed=1)
    b = random_span(tiny_config(), 2, 4, torch.float32, "cpu", seed=1)
    c = random_span(tiny_config(), 2, 4, torch.float32, "cpu", seed=2)
    assert torch.equal(a.layers[2].mlp.up_proj.weight, b.layers[0].mlp.up_proj.weight)  # block 2 either way
    assert not torch.equal(b.layers[0].mlp.up_proj.weight, c.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("quantization", ["int8", "nf4"])
def test_quantization_needs_a_cuda_device(quantization):
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        WorkerConfig.load(model="/models/x", quantization=quantization)
    WorkerConfig.load(model="/models/x", quantization=quantization, device="cuda:0")  # valid where CUDA is


@pytest.mark.parametrize("quantization", ["none", "int8", "nf4"])
def test_decode_step_is_compiled_only_when_asked(quantization):
    """A compiled step rounds differently from transformers' eager one (tokens parted at the 70B shape)."""
    assert not WorkerConfig.load(model="/models/x", quantization=quantization, device="cuda:0").compile_decode
    assert WorkerConfig.load(model="/models/x", quantization=quantization, device="cuda:0", compile_decode=True
                             ).compile_decode


def test_nf4_kernel_is_corollas_unless_turned_off(tmp_path):
    """Corolla's kernel rounds differently from bitsandbytes' (perf/RESULTS.md): a user who needs transformers +
    bitsandbytes' tokens exactly turns it off, in YAML or with --no-nf4-kernel."""
    assert WorkerConfig.load(model="/models/x", quantization="nf4", device="cuda:0").nf4_kernel
    yaml_file = tmp_path / "worker.yaml"
    yaml_file.write_text("model: /models/x\nquantization: nf4\ndevice: cuda:0\nnf4_kernel: false\n")
    assert not WorkerConfig.load(yaml_file).nf4_kernel
    yaml_file.write_text("model: /models/x\nquantization: nf4\ndevice: cuda:0\nnf4_kernel: bitsandbytes\n")
    with pytest.raises(ConfigError, match="nf4_kernel must be true or false, not 'bitsandbytes'"):
        WorkerConfig.load(yaml_file)


def test_span_size_from_the_config_alone_matches_the_built_span():
    config = tiny_config()
    weights, per_token = span_bytes(config, 1, 3, torch.float32, "none")
    assert weights == weight_bytes(random_span(config, 1, 3, torch.float32, "cpu").layers)
    assert per_token == 2 * 2 * (HIDDEN // 4) * 4 * 2  # k and v, 2 KV heads of 16, float32, 2 blocks
    nf4, _ = span_bytes(config, 1, 3, torch.bfloat16, "nf4")
    int8, _ = span_bytes(config, 1, 3, torch.bfloat16, "int8")
    assert nf4 < int8 < weights / 2  # bf16 is half of float32; int8 half again; nf4 about half of that


def test_a_span_that_cannot_fit_its_gpu_is_refused_before_loading():
    config = tiny_config()
    weights, per_token = span_bytes(config, 0, 4, torch.bfloat16, "none")
    check_fits(config, 0, 4, torch.bfloat16, "none", 100, weights + 100 * per_token, "cuda:0")
    with pytest.raises(ConfigError, match=r"blocks 0:4 need .* GiB of weights .* KV cache for cache_tokens 101, "
                                          r"but cuda:0 has .* GiB free"):
        check_fits(config, 0, 4, torch.bfloat16, "none", 101, weights + 100 * per_token, "cuda:0")


def test_a_device_torch_cannot_name_is_refused():
    with pytest.raises(ConfigError, match="device must be a torch device"):
        WorkerConfig.load(model="/models/x", device="gpu7")


@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="needs a machine without a second GPU")
def test_worker_on_a_gpu_the_machine_lacks_says_so_in_one_line(tiny_llama_folder):
    res = subprocess.run([sys.executable, "-m", "corolla", "worker", "--model", tiny_llama_folder, "--blocks", "0:2",
                          "--device", "cuda:1", "--no-mdns", "--port", "0"], capture_output=True, text=True,
                         timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == \
        f"corolla worker: device 'cuda:1': this machine has {torch.cuda.device_count()} CUDA GPU(s)"


def test_unknown_quantization_is_refused():
    with pytest.raises(ConfigError, match="quantization must be one of"):
        WorkerConfig.load(model="/models/x", quantization="fp8")


def test_quantizing_without_bitsandbytes_says_what_to_install(monkeypatch):
    real_import = builtins.__import__

    def no_bitsandbytes(name, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bitsandbytes)
    with pytest.raises(ConfigError, match="bitsandbytes"):
        quantize_linears(torch.nn.Linear(4, 4), "nf4")
    assert quantize_linears(torch.nn.Linear(4, 4), "none") == 0


def test_weight_bytes_of_plain_weights():
    module = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.LayerNorm(4)).to(torch.bfloat16)
    assert weight_bytes(module) == 2 * (8 * 4 + 4 + 4 + 4)


def _steps(span, cache, inputs):
    """Run (hidden, first position) chunks through the span with `cache`; returns each chunk's output."""
    return [span(h, position_ids=torch.arange(p, p + h.shape[1])[None], cache=cache) for h, p in inputs]


def test_static_cache_computes_what_the_dynamic_cache_does():
    span = random_span(tiny_config(), 0, 4, torch.float32, "cpu", seed=3)
    inputs = [(torch.randn(1, 7, HIDDEN), 0)] + [(torch.randn(1, 1, HIDDEN), 7 + i) for i in range(4)]
    with torch.inference_mode():
        want = _steps(span, DynamicCache(config=span.span_config), inputs)
        got = _steps(span, StaticSpanCache(len(span.layers), 16), inputs)
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5


def test_static_cache_rolls_back_to_a_position():
    """The worker re-runs a step from an earlier position after `crop(position)`: the result is as if the
    later tokens had never been seen."""
    span = random_span(tiny_config(), 0, 4, torch.float32, "cpu", seed=3)
    prefix, stale, fresh = torch.randn(1, 5, HIDDEN), torch.randn(1, 3, HIDDEN), torch.randn(1, 2, HIDDEN)
    with torch.inference_mode():
        want = _steps(span, DynamicCache(config=span.span_config), [(prefix, 0), (fresh, 5)])[1]
        cache = StaticSpanCache(len(span.layers), 16)
        _steps(span, cache, [(prefix, 0), (stale, 5)])
        cache.crop(5)
        assert int(cache.get_seq_length()) == 5
        got = _steps(span, cache, [(fresh, 5)])[0]
    assert (got - want).abs().max() < 1e-5


def test_graph_sessions_are_batch_1_whole_span_without_adapters():
    span = random_span(tiny_config(), 0, 4, torch.float32, "cpu")
    graphs = GraphDecoder(span, 10, 14, HIDDEN, torch.float32, torch.device("cpu"))
    assert isinstance(graphs.new_cache(1, 10, 14, "", 32), StaticSpanCache)
    for batch, start, end, adapter in [(2, 10, 14, ""), (1, 11, 14, ""), (1, 10, 14, "lora")]:
        assert isinstance(graphs.new_cache(batch, start, end, adapter, 32), DynamicCache)
    hidden = torch.randn(1, 1, HIDDEN)
    assert graphs.step(DynamicCache(config=span.span_config), 3, hidden, None) is None  # eager session
    assert graphs.step(graphs.new_cache(1, 10, 14, "", 32), 0, hidden, None) is None  # nothing cached yet
    # graph sessions step alone: an eager pass shared with other sessions costs ~20 graph replays (perf/RESULTS.md)
    assert not joinable(graphs.new_cache(1, 10, 14, "", 32))
    assert joinable(graphs.new_cache(2, 10, 14, "", 32))


@pytest.mark.slow
def test_random_weight_workers_serve_without_a_checkpoint(tmp_path):
    """A folder with config.json alone: workers build random blocks; two splits of the blocks agree."""
    config = tiny_config()
    config.save_pretrained(tmp_path)
    hidden = torch.randn(1, 6, HIDDEN)
    outputs = []
    for spans in (["0:2", "2:4"], ["0:1", "1:4"]):
        with LocalSwarm(worker_args(str(tmp_path), spans, "--random-weights", "--seed", "4")) as swarm:
            client = DistributedLlamaForCausalLM(config)
            client.attach_swarm(ClientConfig(initial_peers=swarm.endpoints, wire_dtype=None), tmp_path.name)
            with torch.no_grad():
                outputs.append(client.model.layers(hidden))
    assert (outputs[0] - outputs[1]).abs().max() < 1e-5
