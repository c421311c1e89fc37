"""Rate-limited offloading under a token bucket (issue 14; DESIGN §3 "Rate limit", §5).

The offline study and what the live edge enforces, in one place:
``bucket.py`` (the integer token bucket both use), ``metric.py`` (the
offloading metric from the local exit's outputs), ``data.py`` (the seed's
``.npz`` schema, checked), ``sequences.py`` (i.i.d. / location-reset image
orders, periodic / Markov-modulated arrivals), ``mdp.py`` (value iteration),
``policies.py`` (weak, strong, baseline, lower bound, MDP, learned behind one
interface), ``simulate.py`` (loss and offload rate), ``learned.py`` (fitted
Q-iteration in torch, imported only when asked for), ``live.py`` (the edge's
per-model limiter) and ``cli.py`` (``popex ratelimit``).
"""
