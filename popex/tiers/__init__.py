"""Multi-tier benchmarks and Scission-style prediction (device -> edge -> cloud).

- :mod:`popex.tiers.benchmark_file`: ``popex-benchmark/1`` files, one per system, checked on load;
- :mod:`popex.tiers.network`: Scission's network CSV (ping, bandwidth per ordered pair);
- :mod:`popex.tiers.query`: the ``-d/-e/-c`` criteria, upload and time limits;
- :mod:`popex.tiers.predict`: every system triple and cut, vectorised, the K fastest.
"""
