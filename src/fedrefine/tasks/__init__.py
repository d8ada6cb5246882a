"""Tasks: what is asked and how an answer is read off a model.

- :mod:`~fedrefine.tasks.multiple_choice`: questions in the OpenBookQA schema, their prompts, how options are named;
- :mod:`~fedrefine.tasks.scoring`: option scores (letter logits or cloze likelihoods) over one read of the prompt;
- :mod:`~fedrefine.tasks.routes`: what answers a question (receiver, sender, C2C, T2T, adaptive; query modes);
- :mod:`~fedrefine.tasks.t2t`: the text-to-text baseline (senders write hints the receiver reads).
"""
