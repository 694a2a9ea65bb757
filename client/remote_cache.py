"""What transformers' generate() sees as the KV cache: a window onto a remote inference session.

generate() asks the cache how many tokens it holds to decide which inputs are
new; the real keys and values live on the workers, so this cache only reports
the session's position.
"""
from __future__ import annotations

from transformers.cache_utils import Cache

from corolla.client.session import InferenceSession


class RemotePastKeyValues(Cache):
    def __init__(self, session: InferenceSession):
        super().__init__(layers=[])
        self.session = session

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.session.position - self.session.prefix_length

    @property
    def is_compileable(self) -> bool:
        return False

    @property
    def is_croppable(self) -> bool:
        return False

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search needs the workers to reorder their caches; use greedy or sampling")
