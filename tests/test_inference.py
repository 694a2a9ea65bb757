"""Workers serve spans; a client generates through the chain exactly as the local model does."""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time

import pytest
import torch

from corolla import AutoDistributedModelForCausalLM
from corolla.bus.client import BusLoop, Connection
from corolla.bus.errors import ErrorCode, RemoteError
from corolla.bus.messages import CloseSession, InfoRequest, OpenSession, Step
from corolla.models.registry import UnsupportedModelError
from corolla.worker.launcher import LocalSwarm
from tests.conftest import worker_args

pytestmark = pytest.mark.slow
EXACT = dict(wire_dtype=None)  # float32 on the wire: comparisons to 1e-4 need the computed values


def remote(folder, swarm, **kwargs):
    return AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.endpoints, **{**EXACT, **kwargs})


@pytest.mark.parametrize("spans", [["0:15", "15:30"], ["0:10", "10:20", "20:30"]], ids=["2 workers", "3 workers"])
def test_smollm_logits_match_local(smollm_folder, smollm_local, smollm_tokenizer, spans):
    ids = smollm_tokenizer(["A cat sat on the mat and looked at the dog."], return_tensors="pt").input_ids
    with LocalSwarm(worker_args(smollm_folder, spans)) as swarm:
        model = remote(smollm_folder, swarm)
        with torch.no_grad():
            got, want = model(ids).logits, smollm_local(ids).logits
    assert (got - want).abs().max() < 1e-4


def test_second_family_logits_match_local(tiny_mixtral_folder):
    from transformers import AutoModelForCausalLM
    local = AutoModelForCausalLM.from_pretrained(tiny_mixtral_folder).eval()
    ids = torch.randint(0, 512, (2, 11))
    with LocalSwarm(worker_args(tiny_mixtral_folder, ["0:1", "1:3", "3:4"])) as swarm:
        model = remote(tiny_mixtral_folder, swarm)
        assert type(model).__name__ == "DistributedMixtralForCausalLM"
        with torch.no_grad():
            got, want = model(ids).logits, local(ids).logits
        assert (got - want).abs().max() < 1e-4
        out = model.generate(ids[:1], max_new_tokens=8, do_sample=False)
    assert torch.equal(out, local.generate(ids[:1], max_new_tokens=8, do_sample=False))


@pytest.mark.parametrize("prompt", ["A", "A cat sat on the mat. Then the cat"], ids=["one token", "long prompt"])
def test_greedy_generation_is_token_identical(smollm_folder, smollm_swarm, smollm_local, smollm_tokenizer, prompt):
    ids = smollm_tokenizer(prompt, return_tensors="pt").input_ids
    model = remote(smollm_folder, smollm_swarm)
    want = smollm_local.generate(ids, max_new_tokens=32, do_sample=False)
    got = model.generate(ids, max_new_tokens=32, do_sample=False)
    assert torch.equal(got, want), smollm_tokenizer.decode(got[0])


def test_padded_batch_honours_attention_mask(smollm_folder, smollm_swarm, smollm_local, smollm_tokenizer):
    smollm_tokenizer.padding_side = "left"
    batch = smollm_tokenizer(["A cat sat", "Once upon a time, in a land far away, there"], return_tensors="pt",
                             padding=True)
    assert (batch.attention_mask == 0).any()
    model = remote(smollm_folder, smollm_swarm)
    kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=smollm_tokenizer.eos_token_id)
    want = smollm_local.generate(**batch, **kwargs)
    got = model.generate(**batch, **kwargs)
    assert torch.equal(got, want)
    # each row also equals its unpadded solo run
    for row, prompt in enumerate(["A cat sat", "Once upon a time, in a land far away, there"]):
        solo = smollm_local.generate(**smollm_tokenizer(prompt, return_tensors="pt"), **kwargs)
        assert smollm_tokenizer.decode(got[row], skip_special_tokens=True) == smollm_tokenizer.decode(solo[0], skip_special_tokens=True)


def test_sampling_with_seed_matches_local(smollm_folder, smollm_swarm, smollm_local, smollm_tokenizer):
    ids = smollm_tokenizer("The weather today", return_tensors="pt").input_ids
    model = remote(smollm_folder, smollm_swarm)
    kwargs = dict(max_new_tokens=16, do_sample=True, temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1)
    torch.manual_seed(1234)
    want = smollm_local.generate(ids, **kwargs)
    torch.manual_seed(1234)
    got = model.generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_petals_style_session_api(smollm_folder, smollm_swarm, smollm_local, smollm_tokenizer):
    ids = smollm_tokenizer("A cat sat", return_tensors="pt").input_ids
    model = remote(smollm_folder, smollm_swarm)
    want = smollm_local.generate(ids, max_new_tokens=12, do_sample=False)
    with model.inference_session(max_length=32) as session:
        first = model.generate(ids, max_new_tokens=4, do_sample=False)
        rest = model.generate(None, max_new_tokens=8, do_sample=False)
        assert session.position == want.shape[1] - 1
        assert session.chain == [(w.endpoint, w.start, w.end) for w in smollm_swarm.workers]
    assert torch.equal(first, want[:, :ids.shape[1] + 4])
    assert torch.equal(rest, want)

    # manual stepping: several tokens at once, an empty step, then one token; hidden states visible
    embeds = model.model.embed_tokens(want)
    with torch.no_grad(), model.model.layers.inference_session(max_length=32) as session:
        h1 = session.step(embeds[:, :5])
        h0 = session.step(embeds[:, 5:5])
        h2 = session.step(embeds[:, 5:6])
        local_hidden = smollm_local.model(want[:, :6], output_hidden_states=True).hidden_states[-1]
    assert h0.shape == (1, 0, 576)
    got = model.model.norm(torch.cat([h1, h2], dim=1))
    assert (got - local_hidden).abs().max() < 1e-4


def test_two_sessions_at_once_do_not_disturb_each_other(smollm_folder, smollm_swarm, smollm_local, smollm_tokenizer):
    prompts = ["A cat sat", "The capital of France is"]
    wants = [smollm_local.generate(smollm_tokenizer(p, return_tensors="pt").input_ids, max_new_tokens=24,
                                   do_sample=False) for p in prompts]
    model = remote(smollm_folder, smollm_swarm)
    results = {}

    def run(i):
        results[i] = model.generate(smollm_tokenizer(prompts[i], return_tensors="pt").input_ids, max_new_tokens=24,
                                    do_sample=False)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    for i in range(2):
        assert torch.equal(results[i], wants[i])


def test_server_to_server_push_is_token_identical(tiny_llama_folder):
    from transformers import AutoModelForCausalLM
    local = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).eval()
    ids = torch.tensor([[7, 8, 9, 10, 11]])
    want = local.generate(ids, max_new_tokens=16, do_sample=False)
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:1", "1:3", "3:4"])) as swarm:
        for push in (True, False):  # forced: on loopback the automatic choice is to relay
            model = remote(tiny_llama_folder, swarm, use_server_to_server=push)
            assert torch.equal(model.generate(ids, max_new_tokens=16, do_sample=False), want)
        pushed = [_request(e, InfoRequest()).extra["pushes_received"] for e in swarm.endpoints]
    assert pushed[0] == 0 and pushed[1] > 0 and pushed[2] > 0, pushed


def _request(endpoint, msg):
    bus = BusLoop.get()

    async def go():
        conn = Connection(endpoint, bus.context)
        try:
            return await conn.request(msg, 10.0)
        finally:
            await conn.close()

    return bus.run(go())


def test_session_errors_closed_expired_and_budget(tiny_llama_folder):
    args = worker_args(tiny_llama_folder, ["0:4"], "--cache-tokens", "100", "--idle-timeout", "1")
    with LocalSwarm(args) as swarm:
        endpoint = swarm.endpoints[0]
        hidden = torch.randn(1, 3, 64)
        _request(endpoint, OpenSession("s1", 0, 4, 1, 60))
        _request(endpoint, Step("s1", hidden, 0))
        with pytest.raises(RemoteError) as e:
            _request(endpoint, OpenSession("s2", 0, 4, 1, 60))  # 60 + 60 > 100 tokens
        assert e.value.code == ErrorCode.CACHE_FULL
        _request(endpoint, CloseSession("s1"))
        with pytest.raises(RemoteError) as e:
            _request(endpoint, Step("s1", hidden, 3))
        assert e.value.code == ErrorCode.UNKNOWN_SESSION
        _request(endpoint, OpenSession("s2", 0, 4, 1, 60))  # the budget came back
        time.sleep(7)  # idle timeout 1 s, checked every 5 s
        with pytest.raises(RemoteError) as e:
            _request(endpoint, Step("s2", hidden, 0))
        assert e.value.code == ErrorCode.UNKNOWN_SESSION
        with pytest.raises(RemoteError) as e:
            _request(endpoint, OpenSession("s3", 2, 6, 1, 8))
        assert e.value.code == ErrorCode.WRONG_BLOCKS


def test_a_step_sent_right_behind_its_open_finds_the_session(tiny_llama_folder):
    """The client opens a hop's session and sends its first step without waiting in between (one round trip for
    both): a worker must start one connection's requests in order, and open without waiting."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:4"])) as swarm:
        bus = BusLoop.get()

        async def go():
            conn = Connection(swarm.endpoints[0], bus.context)
            try:
                for i in range(50):
                    opening = asyncio.ensure_future(conn.request(OpenSession(f"p{i}", 0, 4, 1, 8), 10.0))
                    step = asyncio.ensure_future(conn.request(Step(f"p{i}", torch.randn(1, 2, 64), 0), 10.0))
                    await opening
                    assert (await step).hidden.shape == (1, 2, 64)
                    await conn.request(CloseSession(f"p{i}"), 10.0)
            finally:
                await conn.close()

        bus.run(go())


def test_a_refused_session_fails_with_the_workers_reason(tiny_llama_folder):
    """When a worker refuses to open a session, the error the user sees is its reason, not the first step's
    missing session; and the model works on with a session the workers accept."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4"], "--max-length", "64")) as swarm:
        model = remote(tiny_llama_folder, swarm)
        with torch.no_grad():
            with model.model.layers.inference_session(max_length=100) as session:
                with pytest.raises(RemoteError) as e:
                    session.step(torch.randn(1, 3, 64))
            assert e.value.code == ErrorCode.BAD_REQUEST and "max length 100" in str(e.value)
            with model.model.layers.inference_session(max_length=64) as session:
                assert session.step(torch.randn(1, 3, 64)).shape == (1, 3, 64)


def test_step_rolls_back_to_an_earlier_position(tiny_llama_folder):
    """Re-sending a step at an earlier position (replay, a relayed retry) recomputes it from there."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:4"])) as swarm:
        endpoint = swarm.endpoints[0]
        tokens = torch.randn(1, 5, 64)
        _request(endpoint, OpenSession("r", 0, 4, 1, 16))
        _request(endpoint, Step("r", tokens[:, :3], 0))
        first = _request(endpoint, Step("r", tokens[:, 3:5], 3)).hidden
        again = _request(endpoint, Step("r", tokens[:, 3:5], 3)).hidden
        assert torch.equal(first, again)
        empty = _request(endpoint, Step("r", tokens[:, :0], 5, position_ids=torch.zeros(1, 0, dtype=torch.long)))
        assert empty.hidden.shape == (1, 0, 64)
        whole = _request(endpoint, Step("r", tokens, 0)).hidden
        assert (whole[:, 3:5] - first).abs().max() < 1e-5


def test_session_on_later_blocks_of_a_span_matches_a_worker_of_just_those_blocks(tiny_llama_folder):
    """A chain may use the tail of a worker's span: its cache never fills the span's first blocks, so masks and
    positions must come from the first block the session runs. Multi-token steps after the first, with and
    without padding, give what a worker serving exactly those blocks gives."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:4", "2:4"])) as swarm:
        whole, tail = swarm.endpoints
        tokens = torch.randn(1, 9, 64)
        mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1]])
        for name, step_mask in (("plain", None), ("padded", mask)):
            outs = []
            for endpoint in (whole, tail):
                _request(endpoint, OpenSession(name, 2, 4, 1, 16))
                parts = [(0, 4), (4, 7), (7, 9)]
                outs.append(torch.cat([_request(endpoint, Step(
                    name, tokens[:, a:b], a, None if step_mask is None else step_mask[:, a:b],
                    torch.arange(a, b)[None])).hidden for a, b in parts], dim=1))
            assert (outs[0] - outs[1]).abs().max() < 1e-5, name


def test_a_script_that_exits_right_after_generating_frees_the_workers_caches(tiny_llama_folder, tmp_path):
    """A session's close travels in the background (generate() does not wait a round trip for it), so the bus must
    send it before the process exits: the workers' caches are whole again at once, not after their idle timeout."""
    with LocalSwarm(worker_args(tiny_llama_folder, ["0:2", "2:4"])) as swarm:
        script = tmp_path / "script.py"
        script.write_text(
            "import sys, torch\n"
            "from corolla import AutoDistributedModelForCausalLM\n"
            f"model = AutoDistributedModelForCausalLM.from_pretrained({tiny_llama_folder!r}, "
            "initial_peers=sys.argv[1:])\n"
            "model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0)\n")
        done = subprocess.run([sys.executable, str(script), *swarm.endpoints], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0, done.stderr
        infos = [_request(endpoint, InfoRequest()) for endpoint in swarm.endpoints]
        assert all(i.cache_tokens_free == i.cache_tokens_total for i in infos), infos


def test_a_script_that_leaves_its_model_open_exits_quietly(tiny_llama_folder, tmp_path):
    """Most scripts never close their model: the exit must not warn of an unawaited coroutine or fail."""
    script = tmp_path / "script.py"
    script.write_text(
        "import torch\n"
        "from corolla import AutoDistributedModelForCausalLM\n"
        "from corolla.worker.launcher import LocalSwarm\n"
        f"swarm = LocalSwarm([['--model', {tiny_llama_folder!r}, '--blocks', '0:4', '--threads', '1']])\n"
        f"model = AutoDistributedModelForCausalLM.from_pretrained({tiny_llama_folder!r}, "
        "initial_peers=swarm.endpoints)\n"
        "print(model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=0).shape)\n"
        "swarm.stop()\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch.Size([1, 6])" in done.stdout
    assert "RuntimeWarning" not in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("fields, says", [({"model_type": "gpt2", "n_layer": 2}, "has no Corolla family"),
                                          ({"model_type": "llama"}, "does not say num_hidden_layers")])
def test_a_model_corolla_cannot_serve_is_refused_before_anything_starts(tmp_path, fields, says):
    (tmp_path / "config.json").write_text(json.dumps(fields))
    with pytest.raises(UnsupportedModelError, match=says):
        AutoDistributedModelForCausalLM.from_pretrained(tmp_path, initial_peers=["tcp://127.0.0.1:9"])
