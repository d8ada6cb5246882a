"""Privacy: queries rephrased by the receiver so that senders never read the user's text.

- :mod:`~fedrefine.privacy.rephrase`: the rephraser and its cache;
- :mod:`~fedrefine.privacy.faithfulness`: whether a rephrasing invents names (a retry's trigger);
- :mod:`~fedrefine.privacy.plans`: who reads what in each query mode;
- :mod:`~fedrefine.privacy.leakage`: what reached each participant, and leakage figures;
- :mod:`~fedrefine.privacy.accounting`: one route's share of a batch: rephrasing time, faithfulness, leakage.
"""
