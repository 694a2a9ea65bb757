"""Corolla: run large language models across a swarm of machines.

    from corolla import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=[...])
"""
__version__ = "0.1.0"

_CLIENT_NAMES = ("AutoDistributedModelForCausalLM", "AutoDistributedModelForSequenceClassification")
__all__ = list(_CLIENT_NAMES)


def __getattr__(name):
    # Lazy, so `import corolla.bus` does not pay for importing transformers.
    if name in _CLIENT_NAMES:
        from corolla.client import model
        return getattr(model, name)
    raise AttributeError(name)
