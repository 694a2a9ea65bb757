"""An OpenAI-compatible HTTP API, a chat page and a swarm monitor in front of a client of the swarm."""
