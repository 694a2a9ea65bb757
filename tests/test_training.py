"""Fine-tuning through the swarm matches local training: gradients, optimizer steps, adapters, priorities."""
from __future__ import annotations

import asyncio
import copy

import pytest
import torch
import torch.nn.functional as F

from corolla import AutoDistributedModelForCausalLM, AutoDistributedModelForSequenceClassification
from corolla.bus.client import BusLoop, Connection
from corolla.bus.errors import ErrorCode, RemoteError
from corolla.bus.messages import Backward, OpenSession, Step
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args

pytestmark = pytest.mark.slow
PRE = 4


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def _local_prompted_logits(local, ids, prompts, deep=None):
    """Reference: transformers' own model, prompts prepended, deep prompts added by hooks before each block."""
    embeds = torch.cat([prompts.unsqueeze(0).expand(ids.shape[0], -1, -1), local.model.embed_tokens(ids)], dim=1)
    hooks = []
    if deep is not None:
        for i, layer in enumerate(local.model.layers):
            def add(module, args, kwargs, i=i):
                h = args[0]
                return (torch.cat([h[:, :PRE] + deep[i], h[:, PRE:]], dim=1), *args[1:]), kwargs
            hooks.append(layer.register_forward_pre_hook(add, with_kwargs=True))
    try:
        return local(inputs_embeds=embeds).logits[:, PRE:]
    finally:
        for h in hooks:
            h.remove()


def _lm_loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


@pytest.fixture(scope="module")
def swarm(smollm_folder):
    with LocalSwarm(worker_args(smollm_folder, ["0:15", "15:30"])) as s:
        yield s


@pytest.mark.parametrize("mode", ["ptune", "deep_ptune"])
def test_prompt_gradients_match_local(smollm_folder, swarm, smollm_local, smollm_tokenizer, mode):
    ids = smollm_tokenizer(["The movie was wonderful and I loved it", "A dull, boring film I regret"],
                           return_tensors="pt", padding=True).input_ids
    model = AutoDistributedModelForCausalLM.from_pretrained(smollm_folder, initial_peers=swarm.endpoints,
                                                            wire_dtype=None, tuning_mode=mode, pre_seq_len=PRE)
    inner = model.model
    if mode == "deep_ptune":  # away from zero, so every block's prompt matters
        torch.nn.init.normal_(inner.deep_prompt_embeddings.weight, std=0.02)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == (
        {"model.prompt_embeddings.weight"} | ({"model.deep_prompt_embeddings.weight"} if mode == "deep_ptune" else set()))
    _lm_loss(model(ids).logits, ids).backward()

    prompts = inner.prompt_embeddings.weight.detach().clone().requires_grad_(True)
    deep = None
    if mode == "deep_ptune":
        deep = inner.deep_prompt_embeddings.weight.detach().view(PRE, 30, -1).permute(1, 0, 2).clone().requires_grad_(True)
    local = copy.deepcopy(smollm_local).requires_grad_(False)
    _lm_loss(_local_prompted_logits(local, ids, prompts, deep), ids).backward()

    assert _rel(inner.prompt_embeddings.weight.grad, prompts.grad) < 1e-4
    if deep is not None:
        got = inner.deep_prompt_embeddings.weight.grad.view(PRE, 30, -1).permute(1, 0, 2)
        assert _rel(got, deep.grad) < 1e-4


def test_input_embedding_gradients_match_local(smollm_folder, swarm, smollm_local, smollm_tokenizer):
    ids = smollm_tokenizer("Gradients flow back through the workers", return_tensors="pt").input_ids
    model = AutoDistributedModelForCausalLM.from_pretrained(smollm_folder, initial_peers=swarm.endpoints, wire_dtype=None)
    embeds = model.model.embed_tokens(ids).detach().requires_grad_(True)
    _lm_loss(model(inputs_embeds=embeds).logits, ids).backward()
    local_embeds = embeds.detach().clone().requires_grad_(True)
    _lm_loss(smollm_local(inputs_embeds=local_embeds).logits, ids).backward()
    assert _rel(embeds.grad, local_embeds.grad) < 1e-4


def test_optimizer_steps_match_local(tiny_llama_folder):
    """A few SGD steps on ptune prompts through 2 workers land where the same steps run locally land.

    A tiny random model keeps the loss surface smooth: on SmolLM2 one large prompt step lands where float32
    rounding differences of 1e-6 grow into 1e-2 gradient differences, locally as much as through the swarm."""
    from transformers import AutoModelForCausalLM
    ids = torch.randint(0, 512, (3, 12), generator=torch.Generator().manual_seed(0))
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval().requires_grad_(False)
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4"])) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=swarm.endpoints,
                                                                wire_dtype=None, tuning_mode="ptune", pre_seq_len=PRE)
        start = model.model.prompt_embeddings.weight.detach().clone()
        local_prompts = start.clone().requires_grad_(True)
        opt = torch.optim.SGD([model.model.prompt_embeddings.weight], lr=0.5, momentum=0.9)
        local_opt = torch.optim.SGD([local_prompts], lr=0.5, momentum=0.9)
        for _ in range(4):
            opt.zero_grad()
            _lm_loss(model(ids).logits, ids).backward()
            opt.step()
            local_opt.zero_grad()
            _lm_loss(_local_prompted_logits(local, ids, local_prompts), ids).backward()
            local_opt.step()
    got, want = model.model.prompt_embeddings.weight.detach(), local_prompts.detach()
    assert _rel(got, start) > 1e-2  # the steps did move them
    assert _rel(got - start, want - start) < 1e-4


def test_sequence_classification_head_and_prompts_train(smollm_folder, swarm, tmp_path):
    model = AutoDistributedModelForSequenceClassification.from_pretrained(
        smollm_folder, initial_peers=swarm.endpoints, num_labels=2, tuning_mode="ptune", pre_seq_len=PRE)
    assert type(model).__name__ == "DistributedLlamaForSequenceClassification"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"model.prompt_embeddings.weight", "score.weight"}
    ids = torch.tensor([[49, 2644, 2643], [504, 3520, 314]])
    out = model(input_ids=ids, labels=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.score.weight.grad.abs().sum() > 0 and model.model.prompt_embeddings.weight.grad.abs().sum() > 0
    model.save_trainable(tmp_path / "trained.safetensors")
    again = AutoDistributedModelForSequenceClassification.from_pretrained(
        smollm_folder, initial_peers=swarm.endpoints, num_labels=2, tuning_mode="ptune", pre_seq_len=PRE)
    again.load_trainable(tmp_path / "trained.safetensors")
    assert torch.equal(again.score.weight, model.score.weight)
    assert torch.equal(again.model.prompt_embeddings.weight, model.model.prompt_embeddings.weight)


@pytest.fixture(scope="module")
def lora_adapter(tiny_llama_folder, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_folder)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                                 init_lora_weights=False))
    path = tmp_path_factory.mktemp("adapter") / "pirate"
    peft_model.save_pretrained(path)
    return str(path)


def test_worker_served_lora_equals_local_peft(tiny_llama_folder, lora_adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 42, 7]])
    local_base = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    base_tokens = local_base.generate(ids, max_new_tokens=16, do_sample=False)
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_folder), lora_adapter).eval()
    want = local.generate(input_ids=ids, max_new_tokens=16, do_sample=False)
    assert not torch.equal(want, base_tokens)  # the adapter changes the model
    args = worker_args(tiny_llama_folder, ["0:2", "2:4"], "--adapter", f"pirate={lora_adapter}")
    with LocalSwarm(args) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=swarm.endpoints,
                                                                wire_dtype=None, active_adapter="pirate")
        assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), want)
        with torch.no_grad():
            assert (model(ids).logits - local(input_ids=ids).logits).abs().max() < 1e-4
        plain = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=swarm.endpoints,
                                                                wire_dtype=None)
        assert torch.equal(plain.generate(ids, max_new_tokens=16, do_sample=False), base_tokens)
        unknown = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=swarm.endpoints,
                                                                  active_adapter="ninja")
        with pytest.raises(RemoteError) as e:
            unknown(ids)
        assert e.value.code == ErrorCode.UNKNOWN_ADAPTER and "pirate" in str(e.value)


def test_requests_with_an_adapter_go_to_the_workers_serving_it(tiny_llama_folder, lora_adapter):
    """Of two workers with the same blocks, the one announced far faster lacks the adapter: a client using the
    adapter is routed to the other (gossip carries each worker's adapters), for generation and for a forward."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    ids = torch.tensor([[5, 17, 42, 7]])
    local = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_folder), lora_adapter).eval()
    want = local.generate(input_ids=ids, max_new_tokens=8, do_sample=False)
    args = (worker_args(tiny_llama_folder, ["0:4"], "--throughput", "1000000")
            + worker_args(tiny_llama_folder, ["0:4"], "--throughput", "1", "--adapter", f"pirate={lora_adapter}"))
    with LocalSwarm(args) as swarm:
        model = AutoDistributedModelForCausalLM.from_pretrained(tiny_llama_folder, initial_peers=swarm.endpoints,
                                                                wire_dtype=None, active_adapter="pirate")
        with model.inference_session(max_length=16) as session:
            assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), want)
        assert session.chain == [(swarm.endpoints[1], 0, 4)]
        with torch.no_grad():
            assert (model(ids).logits - local(input_ids=ids).logits).abs().max() < 1e-4


def test_training_cannot_starve_inference(tiny_llama_folder):
    """Training work queued first; an inference step sent after it is served ahead of the queue."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:4"])) as swarm:
        endpoint = swarm.endpoints[0]
        bus = BusLoop.get()
        hidden = torch.randn(16, 256, 64)

        async def scenario():
            conn = Connection(endpoint, bus.context)
            order = []
            try:
                await conn.request(OpenSession("interactive", 0, 4, 1, 64), 30)

                async def train(i):
                    await conn.request(Backward(hidden, torch.randn_like(hidden), 0, 4), 120)
                    order.append(f"train{i}")

                async def infer():
                    await conn.request(Step("interactive", torch.randn(1, 1, 64), 0), 120)
                    order.append("step")

                jobs = [asyncio.create_task(train(i)) for i in range(10)]
                await asyncio.sleep(0.05)  # the training requests are queued before the step arrives
                await asyncio.gather(infer(), *jobs)
            finally:
                await conn.close()
            return order

        order = bus.run(scenario())
    assert order.index("step") <= 2, order
