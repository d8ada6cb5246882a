"""Where does a toy sender's cache hold the answer? Linear probes on its K/V, per layer and position.

    python benchmarks/toyworld_probe.py [--sender llama-sender] [--steps 1500]
    python benchmarks/toyworld_probe.py --split dev --out benchmarks/results/toyworld_probe_dev

For every fact of the sender's private group (one question per fact), the sender prefills the
question as the fusers see it, and a linear softmax probe (one per layer, stream and position)
learns the fact's value from the sender's K or V there: trained on fuser-train entities, scored
on held-out ones. Positions: the entity's name, the end of the question (the last message token
that the C2C reference's positions can fuse), and the last prompt token when every participant
reads the answer prefix "The correct answer is" (``fuse_at: last`` with ``prefill_answer``).
Besides the cache's K and V (and ``KV``: both read together, as no fuser stream does), stream ``H`` probes the residual stream after each layer at the answer
prefix's end (layer ``l``: the output of layer ``l``; the top layer's output never enters the cache).
``--split dev``: train on the fuser-train entities the fusers fit on and score the development
entities (``ToyWorldDataModule.val_entities``), with per-attribute accuracy; no held-out entity read.
Writes benchmarks/results/toyworld_probe.{json,md}.
"""

from __future__ import annotations

import argparse

import torch

from fedrefine.bench.records import git_commit, markdown_table, script_command, write_results
from fedrefine.kv.cache import cache_to_layers, returned_cache
from fedrefine.participants.chat import encode_chat
from fedrefine.tasks.multiple_choice import question_messages
from fedrefine.toyworld import DEFAULT_PARTICIPANTS
from fedrefine.toyworld.lightning import ToyParticipant
from fedrefine.toyworld.world import ANSWER_STYLE, ToyWorld, WorldConfig

POSITIONS = ("entity", "question_end", "answer_prefix_end")


@torch.no_grad()
def sender_features(sender, world: ToyWorld, names) -> tuple[dict[tuple[int, str, str], torch.Tensor], torch.Tensor]:
    """Per (layer, stream, position): the sender's K or V there for one question per fact; and the value labels."""
    features: dict[tuple[int, str, str], list[torch.Tensor]] = {}
    labels = []
    for item in (q for q in world.questions(names) if q.answer_key == "A"):
        entity, attribute = item.id.split("-")[:2]
        encoded = {prefill: encode_chat(sender, question_messages(item, ANSWER_STYLE, prefill)) for prefill in (False, True)}
        tokens = sender.tokenizer.convert_ids_to_tokens(encoded[False].input_ids)
        content_end = encoded[False].content_spans[0][1]
        where = {
            "entity": (False, next(i for i, t in enumerate(tokens) if t.strip() == entity)),
            "question_end": (False, max(i for i, (_, end) in enumerate(encoded[False].offsets) if end <= content_end)),
            "answer_prefix_end": (True, len(encoded[True].input_ids) - 1),
        }
        caches = {}
        for prefill, chat in encoded.items():
            output = sender.model(input_ids=torch.tensor([chat.input_ids]), use_cache=True, output_hidden_states=True)
            caches[prefill] = cache_to_layers(returned_cache(output))
            hidden = output.hidden_states[1:]  # (1, T, H) after each layer
        for position, (prefill, index) in where.items():
            for layer, (keys, values) in enumerate(caches[prefill]):
                for stream, tensor in (("K", keys), ("V", values), ("KV", torch.cat((keys, values), dim=-1))):
                    features.setdefault((layer, stream, position), []).append(tensor[0, :, index].flatten())
        for layer, states in enumerate(hidden):  # prefilled: the answer prefix's end
            features.setdefault((layer, "H", "answer_prefix_end"), []).append(states[0, -1])
        values = world.values[attribute]
        labels.append(world.config.attributes.index(attribute) * len(values) + values.index(item.choices[item.answer_index]))
    return {key: torch.stack(rows) for key, rows in features.items()}, torch.tensor(labels)


def probe_accuracy(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                   classes: int, steps: int, hidden: int = 0) -> tuple[float, float, torch.Tensor]:
    """Fit a standardised softmax probe on ``train`` (linear, or an MLP with ``hidden`` units); its accuracy on
    ``train`` and ``test``, and whether it was right on each ``test`` row."""
    mean, std = train.mean(0), train.std(0) + 1e-4
    train, test = (train - mean) / std, (test - mean) / std
    if hidden:  # a one-hidden-layer MLP: does a non-linear reader find more than a linear one?
        probe = torch.nn.Sequential(torch.nn.Linear(train.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, classes))
    else:
        probe = torch.nn.Linear(train.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3 if hidden else 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(probe(train), train_labels).backward()
        optimizer.step()
    with torch.no_grad():
        right = [probe(x).argmax(-1) == y for x, y in ((train, train_labels), (test, test_labels))]
        return float(right[0].float().mean()), float(right[1].float().mean()), right[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sender", default="llama-sender", choices=[p.name for p in DEFAULT_PARTICIPANTS if p.private_groups])
    parser.add_argument("--steps", type=int, default=1500, help="probe optimisation steps")
    parser.add_argument("--split", choices=["held_out", "dev"], default="held_out",
                        help="held_out: train on every fuser-train entity, score the held-out ones; dev: train on the "
                             "fuser-train entities fusers fit on, score the development entities")
    parser.add_argument("--val-entities", type=int, default=16, help="development entities per group (--split dev)")
    parser.add_argument("--mlp", type=int, default=0, metavar="HIDDEN", help="probe with a one-hidden-layer MLP of this width")
    parser.add_argument("--positions", nargs="+", choices=POSITIONS, default=list(POSITIONS))
    parser.add_argument("--out", default="benchmarks/results/toyworld_probe")
    args = parser.parse_args()
    torch.manual_seed(0)
    world = ToyWorld(WorldConfig())
    group = next(p.private_groups[0] for p in DEFAULT_PARTICIPANTS if p.name == args.sender)
    sender = ToyParticipant(args.sender).load()
    fuser_train = world.fuser_train(group)
    if args.split == "dev":
        fit_names, test_names = fuser_train[args.val_entities:], fuser_train[: args.val_entities]
    else:
        fit_names, test_names = fuser_train, world.held_out(group)
    train, train_labels = sender_features(sender, world, fit_names)
    test, test_labels = sender_features(sender, world, test_names)
    classes = len(world.config.attributes) * world.config.values_per_attribute
    attributes = world.config.attributes
    of_attribute = test_labels // world.config.values_per_attribute
    rows = []
    for key in sorted((k for k in train if k[2] in args.positions), key=lambda k: (POSITIONS.index(k[2]), k[0], k[1])):
        fit, scored, right = probe_accuracy(train[key], train_labels, test[key], test_labels, classes, args.steps, args.mlp)
        per_attribute = {a: float(right[of_attribute == i].float().mean()) for i, a in enumerate(attributes)}
        rows.append({"position": key[2], "layer": key[0], "stream": key[1], "fuser_train": fit, args.split: scored,
                     "per_attribute": per_attribute})
    command, commit = script_command(), git_commit()
    scored_name = "held-out entities" if args.split == "held_out" else "development entities"
    table = "\n".join(markdown_table(
        ["position", "layer", "stream", "trained on", scored_name, *attributes],
        [[r["position"], r["layer"], r["stream"], f"{100 * r['fuser_train']:.1f}%", f"{100 * r[args.split]:.1f}%",
          *(f"{100 * r['per_attribute'][a]:.0f}%" for a in attributes)] for r in rows],
    ))
    text = (
        f"# Where the {args.sender}'s cache holds the answer ({f'MLP probes, {args.mlp} hidden units' if args.mlp else 'linear probes'})\n\nCommand: `{command}` at commit `{commit}`.\n"
        f"{len(train_labels)} facts trained on and {len(test_labels)} {scored_name} facts; {classes} classes (attribute x "
        f"value), chance {100 / classes:.1f}% overall, 12.5% within an attribute. Stream H: the residual stream after "
        f"the layer (not in the cache for the top layer).\n\n{table}\n"
    )
    write_results(args.out, {"command": command, "commit": commit, "sender": args.sender, "split": args.split,
                             "probe": f"mlp{args.mlp}" if args.mlp else "linear", "rows": rows}, text)


if __name__ == "__main__":
    main()
