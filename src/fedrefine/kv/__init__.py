"""KV caches as FedRefine reads and writes them.

- :mod:`~fedrefine.kv.cache`: per-layer access over transformers' Cache API, byte counts, padded positions;
- :mod:`~fedrefine.kv.stack`: several layers' K/V on one leading axis, so one operation covers every layer;
- :mod:`~fedrefine.kv.rope`: the one home of rotary-embedding removal and re-application.
"""
