"""A network cut inside a namespace mid-generation: the client routes around the unreachable worker."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import worker_args
from tests.discovery_helpers import ROOT

sys.path.insert(0, str(ROOT))
from perf import netem  # noqa: E402

_ok, _reason = netem.netns_available()
pytestmark = [pytest.mark.slow, pytest.mark.netns,
              pytest.mark.skipif(not _ok, reason=f"network namespaces unavailable: {_reason}")]
PORT = 31400
PROMPT = [3, 14, 15, 92, 65, 35]
NEW = 32

CLIENT = """
import json, subprocess, sys, torch
from transformers.generation.streamers import BaseStreamer
from corolla import AutoDistributedModelForCausalLM
folder, peers, namespaces = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])

class Cut(BaseStreamer):
    seen = -1
    def put(self, value):
        self.seen += 1
        if self.seen == 8:  # cut the link of the worker running blocks 0:2 for this session
            ns = namespaces[session._hops[0].endpoint]
            subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "down"], check=True)
    def end(self):
        pass

model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=peers, wire_dtype=None,
                                                        request_timeout=3.0, mdns=False)
prompt = torch.tensor([[%s]])
with model.inference_session(max_length=prompt.shape[1] + %d) as session:
    out = model.generate(prompt, max_new_tokens=%d, min_new_tokens=%d, do_sample=False, streamer=Cut())
print(json.dumps({"tokens": out[0].tolist(), "recoveries": session.recoveries}))
""" % (", ".join(map(str, PROMPT)), NEW, NEW, NEW)


def test_network_cut_mid_generation(tiny_llama_folder):
    from transformers import AutoModelForCausalLM
    from corolla.worker.launcher import spawn_worker
    want = AutoModelForCausalLM.from_pretrained(tiny_llama_folder).generate(
        torch.tensor([PROMPT]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    hosts = {"w1": "0:2", "w2": "2:4", "w3": "0:2"}
    with netem.Topology([*hosts, "client"], "lan-1g") as topo:
        workers = []
        try:
            for host, span in hosts.items():
                args = worker_args(tiny_llama_folder, [span], "--host", topo.addr(host), "--port", str(PORT),
                                   "--no-mdns", "--gossip-interval", "0.5")[0]
                workers.append(spawn_worker(*args, prefix=["ip", "netns", "exec", topo.netns(host)]))
            for w in workers:
                w.wait_ready(120)
            endpoints = {f"tcp://{topo.addr(h)}:{PORT}": topo.netns(h) for h in hosts}
            res = subprocess.run(topo.command("client", [sys.executable, "-c", CLIENT, tiny_llama_folder,
                                                         json.dumps(list(endpoints)), json.dumps(endpoints)]),
                                 capture_output=True, text=True, timeout=300, cwd=ROOT)
        finally:
            for w in workers:
                w.stop()
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["recoveries"] >= 1
    assert result["tokens"] == want[0].tolist()
