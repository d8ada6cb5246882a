"""A federation: named participants, the fusers between them, and who answers with whom.

- :mod:`~fedrefine.federation.federation`: participants + registry -> a receiver with any subset of senders;
- :mod:`~fedrefine.federation.selection`: which senders a question should hear from (prior table, measured);
- :mod:`~fedrefine.federation.adaptive`: per query, receiver alone / T2T / C2C within a link's latency budget.
"""

from fedrefine.federation.federation import Federation
from fedrefine.federation.selection import MeasuredSelection, PriorSelection, SenderSelection

__all__ = ["Federation", "MeasuredSelection", "PriorSelection", "SenderSelection"]
