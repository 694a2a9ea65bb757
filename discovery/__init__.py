"""How the swarm finds itself: one SwarmView fed by gossip and mDNS.

entry.py      PeerEntry, what the swarm knows of one worker (msgpack-able)
view.py       SwarmView, per model, whatever source found the entries
gossip.py     GossipNode, push-pull anti-entropy over any Transport (bus or memory)
mdns.py       MdnsAnnouncer / MdnsBrowser, `_corolla._tcp.local.` with short-lived records
interfaces.py which interfaces discovery uses, which addresses a worker announces
observer.py   SwarmObserver, a client's (or a starting worker's) discovery
presence.py   WorkerPresence, a worker joining, gossiping, announcing, saying goodbye
memory.py     MemoryNetwork, the in-process transport of perf/sim_gossip.py and tests
"""
