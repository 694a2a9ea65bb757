"""The main job: a private swarm of two workers on this machine, serving SmolLM2-135M, generating text."""
from __future__ import annotations

import time
from pathlib import Path

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def run_demo(prompt: str, max_new_tokens: int, chat: bool = False, sample: bool = False) -> None:
    import torch
    from transformers import AutoTokenizer, TextStreamer

    from corolla.client.model import AutoDistributedModelForCausalLM
    from corolla.models.convert import convert
    from corolla.worker.launcher import LocalSwarm

    folder = convert()
    print(f"model: {folder}")
    worker_args = [["--config", str(CONFIGS / name), "--model", str(folder)]
                   for name in ("demo-worker-a.yaml", "demo-worker-b.yaml")]
    print("starting 2 workers (blocks 0:15 and 15:30) ...")
    with LocalSwarm(worker_args) as swarm:
        for w in swarm.workers:
            print(f"  worker {w.endpoint} serves blocks {w.start}:{w.end}")
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.endpoints)
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True) if chat else prompt
        inputs = tokenizer(text, return_tensors="pt")
        sampling = dict(do_sample=True, temperature=0.7, top_p=0.9) if sample else dict(do_sample=False)
        print(f"\n{prompt}" if not chat else f"\nuser: {prompt}\nassistant:", end="", flush=True)
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer,
                                 pad_token_id=tokenizer.eos_token_id, **sampling)
        elapsed = time.perf_counter() - started
        new = out.shape[1] - inputs.input_ids.shape[1]
        print(f"\n{new} tokens in {elapsed:.2f} s: {new / elapsed:.1f} tokens/s through 2 workers")
        print("stopping workers ...")
