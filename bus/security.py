"""How sockets are secured: public (plain TCP) for open swarms.

Every socket the bus creates passes through here, so a private-swarm mode only
has to change this one place.
"""
from __future__ import annotations

from dataclasses import dataclass

import zmq


@dataclass(frozen=True)
class Security:
    @classmethod
    def public(cls) -> "Security":
        return cls()

    def apply_server(self, socket: zmq.Socket) -> None:
        """Public mode: nothing to set."""

    def apply_client(self, socket: zmq.Socket) -> None:
        """Public mode: nothing to set."""
