"""How sockets are secured: public (plain TCP) or a private swarm (CurveZMQ with one shared swarm key).

Every socket the bus creates passes through here. A private swarm shares one
CURVE key pair, derived from a secret that `corolla keygen` writes to a file:
workers are CURVE servers and admit, through ZAP, only clients that present the
swarm's public key; clients encrypt to that key. A peer without the key cannot
connect, gossip or read activations. The secret is never logged.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger(__name__)

ZAP_DOMAIN = "corolla"
_DERIVATION = b"corolla-swarm-key-v1:"


class SwarmKeyError(ValueError):
    """A swarm key file that cannot be used."""


@dataclass(frozen=True)
class Security:
    public_key: bytes | None = None  # z85; None means a public swarm
    secret_key: bytes | None = field(default=None, repr=False)

    @classmethod
    def public(cls) -> "Security":
        return cls()

    @classmethod
    def from_secret(cls, secret: str) -> "Security":
        """Derive the swarm's CURVE key pair from a shared secret (any string; `corolla keygen` makes a strong one)."""
        if not secret:
            raise SwarmKeyError("the swarm secret is empty")
        secret_key = zmq.utils.z85.encode(hashlib.sha256(_DERIVATION + secret.encode()).digest())
        return cls(zmq.curve_public(secret_key), secret_key)

    @classmethod
    def from_file(cls, path: str | os.PathLike | None) -> "Security":
        if path is None:
            return cls.public()
        try:
            secret = Path(path).expanduser().read_text().strip()
        except OSError as e:
            raise SwarmKeyError(f"cannot read swarm key {path}: {e.strerror}") from None
        return cls.from_secret(secret)

    @property
    def private(self) -> bool:
        return self.public_key is not None

    def apply_server(self, socket: zmq.Socket) -> None:
        if not self.private:
            return
        _authenticator_for(socket.context).allow(self.public_key)
        socket.zap_domain = ZAP_DOMAIN.encode()
        socket.curve_secretkey = self.secret_key
        socket.curve_publickey = self.public_key
        socket.curve_server = True

    def apply_client(self, socket: zmq.Socket) -> None:
        if not self.private:
            return
        socket.curve_serverkey = self.public_key
        socket.curve_publickey = self.public_key
        socket.curve_secretkey = self.secret_key


def generate_secret() -> str:
    """A fresh random swarm secret (z85 text, 256 bits)."""
    return zmq.utils.z85.encode(os.urandom(32)).decode()


class _SwarmKeyProvider:
    """ZAP callback: admit exactly the public keys of the swarms served in this process."""

    def __init__(self):
        self.allowed: set[bytes] = set()

    def allow(self, public_key: bytes) -> None:
        self.allowed.add(public_key)

    def callback(self, domain: str, key: bytes) -> bool:
        ok = key in self.allowed
        if not ok:
            log.warning("refused a connection without the swarm key")
        return ok


_authenticators: dict[int, _SwarmKeyProvider] = {}
_lock = threading.Lock()


def _authenticator_for(context: zmq.Context) -> _SwarmKeyProvider:
    """One ZAP handler per ZeroMQ context (it must live in the context of the sockets it guards)."""
    with _lock:
        provider = _authenticators.get(context.underlying)
        if provider is None:
            provider = _authenticators[context.underlying] = _SwarmKeyProvider()
            authenticator = ThreadAuthenticator(zmq.Context.shadow(context.underlying), log=log)
            authenticator.start()
            authenticator.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=provider)
        return provider
