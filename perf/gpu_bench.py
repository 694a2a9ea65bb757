"""GPU figures in one run: copy bandwidth, then transformers in one process vs a 2-worker Corolla swarm on one GPU.

    python perf/gpu_bench.py [--quick] [--runs llama3-8b:none,llama2-70b:nf4] [--json PATH]

For each model shape (random-normal weights, std 0.02: no checkpoint is read)
and weight format: (a) plain transformers in this process (eager generate(),
batch 1, a 128-token prompt, 64 new tokens) and (b) two worker processes on the
same GPU serving half the blocks each (CUDA-graph decode; --compile-decode compiles it) plus the Corolla
client on the GPU: single-batch decode steps/s and forward tokens/s (batch 1
and 64, 128 tokens). Decode steps/s are also given as a share of the memory-
bandwidth floor: measured copy bandwidth / bytes of weights one decode step
reads. It also checks the CUDA-graph decode path against the eager one:
greedy tokens identical in float32, hidden states close in bf16 (the run fails
otherwise). Prints a table last and writes JSON ($OUT/gpu_bench.json when OUT is
set) and the workers' logs beside it.
"""
from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import statistics
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
log = logging.getLogger("gpu_bench")

DEVICE = "cuda:0"
DTYPE = torch.bfloat16
SEED = 0
PROMPT_TOKENS, NEW_TOKENS = 128, 64
FORWARD_BATCHES, FORWARD_TOKENS = (1, 64), 128
COPY_BYTES = 2 << 30  # per buffer: far beyond the L2 cache
COPY_REPEATS = 20
SHAPES = {  # LlamaConfig keywords
    "llama3-8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=14336, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=8192),
    "llama2-70b": dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                       intermediate_size=28672, vocab_size=32000, rope_theta=10000.0, max_position_embeddings=4096),
    "tiny": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                 intermediate_size=2816, vocab_size=32000, max_position_embeddings=4096),
}
DEFAULT_RUNS = "llama3-8b:none,llama2-70b:nf4"
QUICK_RUNS = "tiny:none,tiny:nf4"
SLOW_BASELINE_STEPS_S = 20  # below this, one timed repeat of the baseline is enough (and saves minutes)
FP32_CHECK_TOKENS = 32
GRAPH_CHECK_SESSIONS = 2  # figures of the last one
FP32_REL_TOLERANCE = 1e-3
BF16_REL_TOLERANCE = 5e-2  # bf16 through tens of blocks, different attention kernels (masked static vs dynamic)
WORKER_READY_TIMEOUT = 480.0  # start-up compiles the decode step


def llama_config(shape: str, dtype: torch.dtype = DTYPE):
    from transformers import LlamaConfig
    config = LlamaConfig(**SHAPES[shape], rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None,
                         eos_token_id=None, pad_token_id=0)  # no EOS: every generation runs its full length
    config.dtype = dtype
    config._attn_implementation = "sdpa"
    return config


def random_causal_lm(cls, config, dtype: torch.dtype, quantization: str):
    """A causal LM (transformers' or Corolla's client) with the same random weights as `random_span` gives the
    workers: blocks from their per-block generators, embeddings / norm / head from the head's."""
    from corolla.worker.quantize import quantize_linears
    from corolla.worker.random_weights import HEAD_BLOCK, block_generator, fill_random_

    with torch.device("meta"):
        model = cls(config)
    base = model.model
    head = block_generator(SEED, HEAD_BLOCK, DEVICE)
    for module in (base.embed_tokens, base.norm, model.lm_head):
        fill_random_(module, head, dtype, DEVICE)
    with torch.device(DEVICE):
        base.rotary_emb = type(base.rotary_emb)(config=config)
    for i, layer in enumerate(base.layers if isinstance(base.layers, torch.nn.ModuleList) else ()):
        fill_random_(layer, block_generator(SEED, i, DEVICE), dtype, DEVICE)
        quantize_linears(layer, quantization)
    return model.eval()


def decode_bytes(model) -> int:
    """Weight bytes one decode step reads: every block, the final norm and the LM head (one embedding row)."""
    from corolla.worker.quantize import weight_bytes
    base = model.model
    return weight_bytes(base.layers) + weight_bytes(base.norm) + weight_bytes(model.lm_head) + \
        base.embed_tokens.weight[0].numel() * base.embed_tokens.weight.element_size()


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read plus bytes written per second (median of timed copies)."""
    src = torch.randn(COPY_BYTES // 2, dtype=torch.bfloat16, device=DEVICE)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(COPY_REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    assert torch.equal(dst, src)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * COPY_BYTES / statistics.median(times)


def timed_generate(model, prompt, n: int) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    return time.perf_counter() - started, out[0, prompt.shape[1]:].cpu()


def decode(model, prompt, new_tokens: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Steps/s of the decode phase alone ((time of N+1 tokens - time of 1) / N, best of `repeats`) and the tokens."""
    timed_generate(model, prompt, 2)  # warm-up: first-call costs (connections, allocator, graph warm-up)
    best, tokens = float("inf"), None
    for _ in range(repeats):
        t_long, tokens = timed_generate(model, prompt, new_tokens + 1)
        t_short, _ = timed_generate(model, prompt, 1)
        best = min(best, (t_long - t_short) / new_tokens)
    return 1.0 / best, tokens


def forward_tokens_per_s(model, batch: int, vocab: int, repeats: int) -> float:
    ids = torch.randint(0, vocab, (batch, FORWARD_TOKENS), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    model(ids[:1, :8])  # warm-up
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        model(ids)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return batch * FORWARD_TOKENS / best


def graph_check(model, tokens: torch.Tensor, compile_decode: bool) -> dict:
    """Teacher-force `tokens` (prompt, then what generate() chose) through the model's blocks twice: eagerly with a
    DynamicCache (the worker's eager path) and as the worker's CUDA-graph replays over a static cache, in
    GRAPH_CHECK_SESSIONS sessions one after another. Returns, for the last one, the
    largest relative error of the steps' hidden states, at how many steps the graph path's greedy token agrees
    with the eager path's and with generate()'s (all of them: the same greedy generation), and step times."""
    from corolla.models.registry import family_for
    from corolla.worker.cuda_graph import GraphDecoder

    config = model.config
    with torch.device("meta"):
        span = family_for(config).span(config, 0, config.num_hidden_layers)
    span.layers = model.model.layers  # the same blocks, no second copy of the weights
    with torch.device(DEVICE):
        span.rotary_emb = type(span.rotary_emb)(config=config)
    dtype = model.model.embed_tokens.weight.dtype
    graphs = GraphDecoder(span, 0, len(span.layers), config.hidden_size, dtype, torch.device(DEVICE),
                          compile=compile_decode)
    prompt, steps = tokens[:PROMPT_TOKENS], tokens[PROMPT_TOKENS:]
    embed = model.model.embed_tokens

    def greedy(hidden):
        return int(model.lm_head(model.model.norm(hidden.to(DEVICE)))[0, -1].argmax())

    with torch.inference_mode():
        for _ in range(GRAPH_CHECK_SESSIONS):  # a worker captures each session's graph after earlier ones are gone
            errors, agree, match, times = [], 0, 0, {"eager": [], "graph": []}
            dynamic = span.new_cache()
            static = graphs.new_cache(1, 0, len(span.layers), "", len(tokens))
            positions = torch.arange(PROMPT_TOKENS, device=DEVICE)[None]
            h_eager = span(embed(prompt[None].to(DEVICE)), position_ids=positions, cache=dynamic)
            h_graph = span(embed(prompt[None].to(DEVICE)), position_ids=positions, cache=static)
            for k, token in enumerate(steps):
                chosen = greedy(h_graph)
                agree += greedy(h_eager) == chosen
                match += int(token) == chosen
                position = PROMPT_TOKENS + k
                hidden = embed(token.view(1, 1).to(DEVICE))
                torch.cuda.synchronize()
                started = time.perf_counter()
                h_eager = span(hidden, position_ids=torch.tensor([[position]], device=DEVICE), cache=dynamic)
                torch.cuda.synchronize()
                times["eager"].append(time.perf_counter() - started)
                started = time.perf_counter()
                h_graph = graphs.step(static, position, hidden, None)
                times["graph"].append(time.perf_counter() - started)
                assert h_graph is not None, "the graph path declined a batch-1 single-token step"
                errors.append(float((h_graph.to(DEVICE).float() - h_eager.float()).norm() / h_eager.float().norm()))
            del static
    return {"max_rel_err": max(errors), "greedy_agree": agree, "greedy_match_generate": match, "steps": len(steps),
            "eager_step_ms": 1e3 * statistics.median(times["eager"][1:]),
            "graph_step_ms": 1e3 * statistics.median(times["graph"][1:]),
            "graph_first_step_ms": 1e3 * times["graph"][0]}  # the capture, then a replay


def fp32_graph_check(compile_decode: bool) -> dict:
    """Greedy tokens of the CUDA-graph path equal transformers' eager generate() in float32."""
    from transformers import LlamaForCausalLM
    config = llama_config("tiny", torch.float32)
    model = random_causal_lm(LlamaForCausalLM, config, torch.float32, "none")
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        _, tokens = timed_generate(model, prompt.to(DEVICE), FP32_CHECK_TOKENS)
    check = graph_check(model, torch.cat([prompt[0], tokens]), compile_decode)
    check["passed"] = check["greedy_agree"] == check["greedy_match_generate"] == check["steps"] and \
        check["max_rel_err"] < FP32_REL_TOLERANCE
    return check


def checked(check, *args) -> dict:
    """A check's figures, or its failure (the benchmark's figures still count)."""
    try:
        return check(*args)
    except Exception as e:
        log.exception("%s failed", check.__name__)
        return {"passed": False, "error": f"{type(e).__name__}: {e}"}


def run_model(shape: str, quantization: str, bandwidth: float, quick: bool, logs: Path, compile_decode: bool = False) -> dict:
    from transformers import LlamaForCausalLM

    from corolla.client.config import ClientConfig
    from corolla.client.families import DistributedLlamaForCausalLM
    from corolla.worker.launcher import LocalSwarm

    config = llama_config(shape)
    new_tokens = 8 if quick else NEW_TOKENS
    prompt = torch.randint(0, config.vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(DEVICE)
    result: dict = {"shape": shape, "quantization": quantization, "dtype": str(DTYPE)}
    log.info("%s %s: building the one-process model", shape, quantization)
    local = random_causal_lm(LlamaForCausalLM, config, DTYPE, quantization)
    result["decode_bytes"] = decode_bytes(local)
    result["floor_steps_s"] = bandwidth / result["decode_bytes"]
    with torch.inference_mode():
        log.info("%s %s: transformers decode", shape, quantization)
        steps_s, local_tokens = decode(local, prompt, new_tokens, 1)
        if steps_s > SLOW_BASELINE_STEPS_S:
            steps_s = max(steps_s, decode(local, prompt, new_tokens, 2)[0])
        result["local"] = {"decode_steps_s": steps_s}
        for b in FORWARD_BATCHES:
            result["local"][f"forward_b{b}_tok_s"] = forward_tokens_per_s(local, b, config.vocab_size, 2)
    if quantization == "none":
        log.info("%s: CUDA-graph vs eager decode, in process", shape)
        # The capture of the eager step here (the workers compile theirs, as the float32 check does): a compile of
        # all the blocks would cost the run minutes.
        check = checked(graph_check, local, torch.cat([prompt[0].cpu(), local_tokens]), False)
        check.setdefault("passed", check["max_rel_err"] < BF16_REL_TOLERANCE)
        result["graph_check_bf16"] = check
    del local
    gc.collect()
    torch.cuda.empty_cache()

    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        half = config.num_hidden_layers // 2
        common = ["--model", folder, "--dtype", "bfloat16", "--device", DEVICE, "--random-weights", "--seed",
                  str(SEED), "--quantization", quantization, "--no-mdns", "--throughput", "1",
                  *(["--compile-decode"] if compile_decode else [])]
        log.info("%s %s: starting 2 workers", shape, quantization)
        with LocalSwarm([[*common, "--blocks", f"0:{half}"], [*common, "--blocks", f"{half}:{config.num_hidden_layers}"]],
                        timeout=WORKER_READY_TIMEOUT, env={"TORCH_LOGS": "recompiles"}) as swarm:
            try:
                client = random_causal_lm(DistributedLlamaForCausalLM, config, DTYPE, "none")
                client.attach_swarm(ClientConfig(initial_peers=swarm.endpoints, wire_dtype=None), Path(folder).name)
                with torch.inference_mode():
                    log.info("%s %s: swarm decode", shape, quantization)
                    steps_s, swarm_tokens = decode(client, prompt, new_tokens, 3)
                    result["swarm"] = {"decode_steps_s": steps_s}
                    for b in FORWARD_BATCHES:
                        result["swarm"][f"forward_b{b}_tok_s"] = forward_tokens_per_s(client, b, config.vocab_size, 2)
            finally:
                for i, w in enumerate(swarm.workers):
                    (logs / f"worker{i}_{shape}_{quantization}.log").write_text("".join(w.output))
            notes = [line.strip() for w in swarm.workers for line in w.output
                     if "compiled in" in line or "WARNING" in line and "RANDOM WEIGHTS" not in line]
        result["worker_notes"] = notes
    same = (swarm_tokens == local_tokens).long()
    result["swarm_tokens_equal_local"] = int(same.cumprod(0).sum())  # leading tokens identical
    result["new_tokens"] = new_tokens
    for side in ("local", "swarm"):
        result[side]["floor_share"] = result[side]["decode_steps_s"] / result["floor_steps_s"]
    del client
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small model and few tokens: check every path fast")
    parser.add_argument("--runs", help=f"shape:quantization,... (default {DEFAULT_RUNS}; --quick: {QUICK_RUNS})")
    parser.add_argument("--json", help="where to write the figures (default $OUT/gpu_bench.json or perf/out/)")
    parser.add_argument("--compile-decode", action="store_true", help="workers compile their graphed decode step")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not torch.cuda.is_available():
        raise SystemExit("gpu_bench needs a CUDA GPU")
    runs = [r.split(":") for r in (args.runs or (QUICK_RUNS if args.quick else DEFAULT_RUNS)).split(",")]
    out = Path(args.json or Path(os.environ.get("OUT") or "perf/out") / "gpu_bench.json")
    out.parent.mkdir(parents=True, exist_ok=True)

    props = torch.cuda.get_device_properties(DEVICE)
    machine = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), {os.cpu_count()} CPU cores, torch {torch.__version__}"
    report: dict = {"machine": machine, "date": str(date.today()), "platform": platform.platform(), "runs": []}
    report["copy_bandwidth_gb_s"] = copy_bandwidth() / 1e9
    log.info("copy bandwidth %.0f GB/s (read + write)", report["copy_bandwidth_gb_s"])
    report["graph_check_fp32"] = checked(fp32_graph_check, True)
    log.info("float32 CUDA-graph check: %s", report["graph_check_fp32"])
    for shape, quantization in runs:
        try:
            report["runs"].append(run_model(shape, quantization, report["copy_bandwidth_gb_s"] * 1e9, args.quick,
                                            out.parent, args.compile_decode))
        except Exception as e:  # the other runs' figures still count
            log.exception("%s %s failed", shape, quantization)
            report["runs"].append({"shape": shape, "quantization": quantization, "error": f"{type(e).__name__}: {e}"})
        out.write_text(json.dumps(report, indent=2))

    print(f"\n{machine}; {report['date']}; device-to-device copy {report['copy_bandwidth_gb_s']:.0f} GB/s "
          f"(read + write); prompt {PROMPT_TOKENS} tokens, batch 1; swarm = 2 workers on the same GPU + client")
    check = report["graph_check_fp32"]
    if "error" in check:
        print(f"CUDA-graph decode vs eager, float32: FAILED {check['error']}")
    else:
        print(f"CUDA-graph decode vs eager, float32: greedy tokens {check['greedy_match_generate']}/{check['steps']} "
              f"identical to transformers' generate(), max relative error {check['max_rel_err']:.1e}")
    for r in report["runs"]:
        name = f"{r['shape']} {r['quantization'] if r['quantization'] != 'none' else 'bf16'}"
        if "error" in r:
            print(f"\n{name}: FAILED {r['error']}")
            continue
        print(f"\n{name}: {r['decode_bytes'] / 1e9:.1f} GB of weights read per decode step, floor "
              f"{r['floor_steps_s']:.0f} steps/s; swarm's greedy tokens = transformers' for the first "
              f"{r['swarm_tokens_equal_local']} of {r['new_tokens'] + 1}")
        g = r.get("graph_check_bf16", {})
        if "error" in g:
            print(f"  in-process CUDA-graph check FAILED: {g['error']}")
        elif g:
            print(f"  in process, all blocks: eager step {g['eager_step_ms']:.2f} ms, CUDA-graph step "
                  f"{g['graph_step_ms']:.2f} ms (first, with its capture: {g['graph_first_step_ms']:.0f} ms); bf16 max relative error {g['max_rel_err']:.1e}; greedy tokens "
                  f"{g['greedy_agree']}/{g['steps']} = eager path's, {g['greedy_match_generate']}/{g['steps']} = "
                  f"generate()'s")
        print(f"  {'metric':30} {'transformers':>12} {'swarm':>10}")
        for key, label in (("decode_steps_s", "decode steps/s"), ("floor_share", "  share of the floor"),
                           ("forward_b1_tok_s", "forward tokens/s, 1 x 128"),
                           ("forward_b64_tok_s", "forward tokens/s, 64 x 128")):
            a, b = r["local"][key], r["swarm"][key]
            fmt = "{:>12.0%} {:>10.0%}" if key == "floor_share" else "{:>12.1f} {:>10.1f}"
            print(f"  {label:30} " + fmt.format(a, b))
        for note in r["worker_notes"]:
            print(f"  worker: {note}")
    print(f"\nfigures written to {out}")
    failed = [c for c in [report["graph_check_fp32"], *(r.get("graph_check_bf16") for r in report["runs"])]
              if c is not None and not c["passed"]] + [r for r in report["runs"] if "error" in r]
    if failed:
        raise SystemExit(f"FAILED: {failed}")


if __name__ == "__main__":
    main()
