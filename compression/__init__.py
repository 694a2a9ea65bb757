"""Tensor codecs for the wire (raw, lz4, blockwise int8); see ``codecs``."""

from .codecs import BLOCK, CODECS, DTYPES, CodecError, TensorSpec, decode, encode

__all__ = ["BLOCK", "CODECS", "DTYPES", "CodecError", "TensorSpec", "decode", "encode"]
