"""`syn6`: a synthetic, controlled continual-DAP world that runs offline on a CPU in minutes.

The world:
- a general vocabulary of nouns in hidden *types*, each type with its own adjective group; the
  general corpus describes nouns with their type's adjectives and pretrains `syn-base`;
- six domains named after the paper's, each with its own entities drawn from one shared name
  pool; every domain class borrows one type's adjective group through a per-domain permutation,
  so DAP-training only has to teach which known type each new entity has;
- an end task per domain that names an entity in a weakly informative sentence and is labelled
  with the entity's class; test entities never occur in task training examples, only in the
  corpus, so only DAP-training can carry the knowledge;
- transfer: camera reuses phone's class permutation and half of phone's entities; ai shares
  three classes and some entities with acl; interference: names recur across the other domains
  with unrelated classes, so sequential training overwrites them.
Everything is generated from fixed seeds: the same suite on every machine.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from datasets import Dataset

from tasks.registry import PAPER_ORDERS, Domain, EndTask, Suite, register_suite

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FUNCTION_WORDS = (
    "the is and . a was very can be every looks here i saw today we talked about there "
    "my friend liked at of this that it seems quite rather found"
).split()

# name, number of classes, the word the task sentences use for the domain's setting
DOMAINS = [
    ("restaurant", 3, "dish"),
    ("acl", 6, "paper"),
    ("ai", 7, "model"),
    ("phone", 2, "phone"),
    ("pubmed", 13, "study"),
    ("camera", 2, "camera"),
]
GENERAL_SEED = 13
WORLD_SEED = 2023


@dataclass(frozen=True)
class Profile:
    n_types: int = 14
    nouns_per_type: int = 20
    adjectives_per_type: int = 6
    general_sentences_per_noun: int = 40
    name_pool: int = 500
    entities_per_domain: int = 60
    mentions_per_entity: int = 12
    # held-out corpus sentences per entity for the per-domain MLM loss, drawn from their own
    # seed after the corpus (the corpus, tasks and every DAP batch are as without them)
    heldout_mentions_per_entity: int = 12
    attribute_noise: float = 0.25
    train_entity_share: float = 0.6
    task_examples_train: int = 4
    task_examples_test: int = 6
    hint_rate: float = 0.15
    n_domains: int = 6
    # syn6v2: entity names are written as 2..name_pieces pieces from a pool of `piece_pool`
    # made-up sub-words; the general corpus trains every piece by mentioning `general_names`
    # other compositions of them, each `mentions_per_general_name` times, in sentences that
    # reveal no type (0: v1, every name one token of its own that θ0 never sees)
    name_pieces: int = 0
    piece_pool: int = 0
    general_names: int = 0
    mentions_per_general_name: int = 0
    # v1 `names` profile: θ0's pre-training corpus mentions every name of the pool this many
    # times in sentences that reveal no type (MENTIONS), so θ0 has trained embeddings for the
    # entity names but knows none of their classes (0: names θ0 never sees)
    name_mentions: int = 0


PROFILES = {
    "default": Profile(),
    # θ0 reads every entity name 8 times, typeless (4,000 sentences beside default's 10,640),
    # the rest as `default`: can frozen-embedding rows learn names θ0 has embedded?
    "names": Profile(name_mentions=8),
    "tiny": Profile(
        n_types=8,
        nouns_per_type=8,
        general_sentences_per_noun=12,
        name_pool=120,
        entities_per_domain=24,
        mentions_per_entity=6,
        heldout_mentions_per_entity=2,
        task_examples_train=2,
        task_examples_test=3,
        n_domains=3,
    ),
}

# Training defaults each profile hands the run config (flags and presets override them).
RUN_DEFAULTS = {
    "default": dict(
        dap_steps=100,
        dap_batch_size=64,
        dap_lr=1e-3,
        max_length=16,
        ft_epochs=15,
        ft_lr=5e-4,
        ft_batch_size=16,
        importance_batches=8,
        importance_batch_size=64,  # 512 of a domain's 720 sequences, each once
    ),
    "tiny": dict(
        dap_steps=8,
        dap_batch_size=16,
        dap_lr=1e-3,
        max_length=16,
        ft_epochs=2,
        ft_lr=5e-4,
        ft_batch_size=16,
        importance_batches=2,
        importance_batch_size=16,
    ),
}
BASE_MODELS = {
    "default": dict(
        kind="syn-base", layers=4, hidden=128, heads=4, intermediate=512,
        pretrain_steps=800, pretrain_batch_size=64, pretrain_lr=1e-3, max_length=16,
    ),
    "tiny": dict(
        kind="syn-base", layers=2, hidden=32, heads=2, intermediate=64,
        pretrain_steps=30, pretrain_batch_size=32, pretrain_lr=1e-3, max_length=16,
    ),
}
RUN_DEFAULTS["names"] = RUN_DEFAULTS["default"]
BASE_MODELS["names"] = BASE_MODELS["default"]  # its corpus differs, so its build key does


def _pseudo_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Pronounceable made-up words, unique against `taken` (which is updated)."""
    onsets = "b d f g k l m n p r s t v z br dr gl kr pl st tr".split()
    vowels = "a e i o u ai ou".split()
    words: list[str] = []
    while len(words) < count:
        word = "".join(rng.choice(onsets) + rng.choice(vowels) for _ in range(rng.choice((2, 3))))
        if word not in taken and word not in FUNCTION_WORDS:
            taken.add(word)
            words.append(word)
    return words


# sentences of the general corpus that mention a name and say nothing of its type
MENTIONS = [
    "we talked about the {e} .",
    "there is the {e} .",
    "it seems the {e} was here .",
    "i saw the {e} today .",
    "my friend liked the {e} .",
]


def _compositions(rng: random.Random, pieces: list[str], count: int, longest: int,
                  taken: set[str]) -> list[str]:
    """`count` distinct words of 2..`longest` pieces, unique against `taken` (updated).

    Pieces are dealt from a reshuffled deck, so every piece is used about equally often: a
    piece occurs in a few words of unrelated types, as a real tokeniser's sub-words do."""
    deck: list[str] = []
    words: list[str] = []
    while len(words) < count:
        size = rng.randint(2, longest)
        if len(deck) < size:
            deck += rng.sample(pieces, len(pieces))
        word = " ".join(deck[:size])
        if len(set(deck[:size])) == size and word not in taken:
            taken.add(word)
            words.append(word)
            del deck[:size]
        else:  # keep the pieces in play: the first goes to the back of the deck
            deck.append(deck.pop(0))
    return words


def _describe(rng: random.Random, subject: str, adjectives: list[str]) -> str:
    """One corpus sentence about `subject`; the main shape is most of the corpus."""
    a, b = rng.sample(adjectives, 2)
    roll = rng.random()
    if roll < 0.75:
        return f"the {subject} is {a} and {b} ."
    if roll < 0.85:
        return f"a {subject} can be very {a} ."
    if roll < 0.93:
        return f"this {subject} looks rather {a} ."
    return f"i found the {subject} quite {a} and {b} ."


def _noisy(rng: random.Random, group: list[str], all_adjectives: list[str], noise: float):
    """The group's adjectives, each replaced by a random one with probability `noise`."""
    return [rng.choice(all_adjectives) if rng.random() < noise else a for a in group]


def build_world(profile: Profile) -> dict:
    """Generate the whole synthetic world (vocabulary, corpora, tasks) deterministically."""
    rng = random.Random(GENERAL_SEED)
    taken: set[str] = set()
    nouns = [_pseudo_words(rng, profile.nouns_per_type, taken) for _ in range(profile.n_types)]
    adjectives = [
        _pseudo_words(rng, profile.adjectives_per_type, taken) for _ in range(profile.n_types)
    ]
    mentioned: list[str] = []
    if profile.name_pieces:  # v2: names composed of pieces the general corpus trains
        if 2 * profile.general_names < profile.piece_pool:
            raise ValueError(f"general_names {profile.general_names} cannot cover piece_pool "
                             f"{profile.piece_pool}: some pieces would stay untrained")
        pieces = _pseudo_words(rng, profile.piece_pool, taken)
        names = _compositions(rng, pieces, profile.name_pool, profile.name_pieces, taken)
        # other compositions of the same pieces, mentioned in the general corpus without a type
        mentioned = _compositions(rng, pieces, profile.general_names, profile.name_pieces, taken)
    else:  # v1: every name one token θ0 never sees
        names = _pseudo_words(rng, profile.name_pool, taken)
    all_adjectives = [a for group in adjectives for a in group]

    general = []
    for t, group in enumerate(nouns):
        for noun in group:
            for _ in range(profile.general_sentences_per_noun):
                general.append(_describe(rng, noun, adjectives[t]))
    rng.shuffle(general)
    held_out = max(64, len(general) // 20)
    general_train = general[held_out:]
    if mentioned:  # pretraining only: every piece is trained, the held-out set stays v1's kind
        general_train += [rng.choice(MENTIONS).format(e=name) for name in mentioned
                          for _ in range(profile.mentions_per_general_name)]
        rng.shuffle(general_train)
    if profile.name_mentions:  # its own stream: the world and tasks are v1's, unchanged
        mention_rng = random.Random(GENERAL_SEED + 1)
        general_train += [mention_rng.choice(MENTIONS).format(e=name) for name in names
                          for _ in range(profile.name_mentions)]
        mention_rng.shuffle(general_train)

    world_rng = random.Random(WORLD_SEED)
    # class -> hidden type, per domain; camera borrows phone's, ai shares three with acl
    permutations: dict[str, list[int]] = {}
    entities: dict[str, dict[str, int]] = {}
    for name, n_classes, _ in DOMAINS:
        n_classes = min(n_classes, profile.n_types)
        if name == "camera":
            permutations[name] = list(permutations["phone"])
        else:
            perm = world_rng.sample(range(profile.n_types), n_classes)
            if name == "ai":
                acl = permutations["acl"][:3]
                perm = acl + [t for t in perm if t not in acl][: n_classes - 3]
            permutations[name] = perm
        chosen: dict[str, int] = {}
        shared_from = {"camera": ("phone", 0.5), "ai": ("acl", 0.25)}.get(name)
        if shared_from:
            source, share = shared_from
            keep = [
                (e, c) for e, c in entities[source].items() if c < n_classes
                and permutations[source][c] == permutations[name][c]
            ]
            world_rng.shuffle(keep)
            chosen.update(keep[: int(share * profile.entities_per_domain)])
        pool = [n for n in names if n not in chosen]
        world_rng.shuffle(pool)
        counts = [sum(1 for c in chosen.values() if c == k) for k in range(n_classes)]
        while len(chosen) < profile.entities_per_domain:
            k = counts.index(min(counts))
            chosen[pool.pop()] = k
            counts[k] += 1
        entities[name] = chosen

    return dict(
        nouns=nouns,
        adjectives=adjectives,
        all_adjectives=all_adjectives,
        names=names,
        mentioned=mentioned,
        general_train=general_train,
        general_test=general[:held_out],
        permutations=permutations,
        entities=entities,
    )


def _domain(world: dict, profile: Profile, name: str, n_classes: int, place: str) -> Domain:
    rng = random.Random(f"{WORLD_SEED}-{name}")
    perm = world["permutations"][name]
    ents = world["entities"][name]
    corpus = []
    for entity, cls in ents.items():
        group = world["adjectives"][perm[cls]]
        for _ in range(profile.mentions_per_entity):
            described = _noisy(rng, group, world["all_adjectives"], profile.attribute_noise)
            corpus.append(_describe(rng, entity, described))
    rng.shuffle(corpus)

    templates = [
        "i saw the {e} at the {p} today .",
        "we talked about the {e} .",
        "my friend liked the {e} at the {p} .",
        "there is the {e} .",
        "that {p} was about the {e} .",
        "it seems the {e} was here .",
    ]
    by_class: dict[int, list[str]] = {}
    for entity, cls in ents.items():
        by_class.setdefault(cls, []).append(entity)
    train_entities, test_entities = [], []
    for cls in sorted(by_class):
        group = sorted(by_class[cls])
        rng.shuffle(group)
        cut = max(1, round(profile.train_entity_share * len(group)))
        train_entities += [(e, cls) for e in group[:cut]]
        test_entities += [(e, cls) for e in group[cut:]]

    def examples(pairs: list[tuple[str, int]], per_entity: int) -> Dataset:
        texts, labels = [], []
        for entity, cls in pairs:
            for template in rng.sample(templates, per_entity):
                text = template.format(e=entity, p=place)
                if rng.random() < profile.hint_rate:
                    hint = rng.choice(world["adjectives"][perm[cls]])
                    text = text.replace(f"the {entity}", f"the {hint} {entity}", 1)
                texts.append(text)
                labels.append(cls)
        order = list(range(len(texts)))
        rng.shuffle(order)
        return Dataset.from_dict(
            {"text": [texts[i] for i in order], "label": [labels[i] for i in order]}
        )

    task = EndTask(
        name=f"{name}-syn",
        labels=[f"class{k}" for k in range(n_classes)],
        train=examples(train_entities, profile.task_examples_train),
        test=examples(test_entities, profile.task_examples_test),
    )
    return Domain(name=name, corpus=Dataset.from_dict({"text": corpus}), task=task,
                  heldout=_heldout(world, profile, name, set(corpus)))


def _heldout(world: dict, profile: Profile, name: str, corpus: set[str]) -> Dataset:
    """More corpus sentences of domain `name`, from a seed of their own: held-out text for the
    domain's MLM loss. A sentence that the corpus also holds is dropped (short sentences repeat),
    so no DAP batch draws one."""
    rng = random.Random(f"{WORLD_SEED}-{name}-heldout")
    perm = world["permutations"][name]
    texts = []
    for entity, cls in world["entities"][name].items():
        group = world["adjectives"][perm[cls]]
        for _ in range(profile.heldout_mentions_per_entity):
            described = _noisy(rng, group, world["all_adjectives"], profile.attribute_noise)
            texts.append(_describe(rng, entity, described))
    return Dataset.from_dict({"text": [t for t in texts if t not in corpus]})


def vocabulary(world: dict) -> list[str]:
    """The word-level vocabulary: a v2 name adds its pieces, a v1 one itself."""
    words = list(SPECIAL_TOKENS) + list(FUNCTION_WORDS) + [p for _, _, p in DOMAINS]
    words += [w for g in world["nouns"] for n in g for w in n.split()]
    words += world["all_adjectives"] + [w for n in world["names"] for w in n.split()]
    words += [w for n in world["mentioned"] for w in n.split()]
    seen: set[str] = set()
    return [w for w in words if not (w in seen or seen.add(w))]


PROFILES_V2 = {
    "default": dataclasses.replace(PROFILES["default"], name_pieces=2, piece_pool=400,
                                   general_names=300, mentions_per_general_name=8),
    "tiny": dataclasses.replace(PROFILES["tiny"], name_pieces=2, piece_pool=120,
                                general_names=60, mentions_per_general_name=4),
}


# each synthetic suite's generator profiles, by suite name
SUITE_PROFILES = {"syn6": PROFILES, "syn6v2": PROFILES_V2}


def build_suite(name: str, spec: Profile, profile: str) -> Suite:
    """The suite `name` generated from `spec`, with the profile's θ0 and training defaults."""
    world = build_world(spec)
    domains = {}
    for domain, n_classes, place in DOMAINS:
        domains[domain] = _domain(world, spec, domain, min(n_classes, spec.n_types), place)
    orders = [order[: spec.n_domains] for order in PAPER_ORDERS]
    used = {d for order in orders for d in order}
    return Suite(
        name=name,
        profile=profile,
        domains={k: v for k, v in domains.items() if k in used},
        orders=orders,
        base_model=dict(BASE_MODELS[profile]),
        defaults=dict(RUN_DEFAULTS[profile]),
        general_corpus=Dataset.from_dict({"text": world["general_test"]}),
        vocabulary=vocabulary(world),
        synthetic=True,
        pretrain_corpus=Dataset.from_dict({"text": world["general_train"]}),
        description="synthetic (SYNTHETIC.md); not the paper's data",
    )


@register_suite("syn6", ("default", "tiny", "names"),
                "synthetic six-domain world (offline, CPU minutes)")
def build_syn6(profile: str) -> Suite:
    return build_suite("syn6", SUITE_PROFILES["syn6"][profile], profile)


@register_suite("syn6v2", ("default", "tiny"),
                "syn6 with nouns and entity names composed of trained sub-word pieces")
def build_syn6v2(profile: str) -> Suite:
    return build_suite("syn6v2", SUITE_PROFILES["syn6v2"][profile], profile)


def name_separation(model: Any, tokenizer: Any, words: list[str]) -> dict[str, float]:
    """How far apart θ0 keeps `words`: mean pairwise cosine of their representations.

    `input`: the input embeddings of the distinct tokens the words are written with (what a
    method that freezes embeddings starts from: a v2 name's pieces, a v1 name itself);
    `context`: the mean of each word's last hidden states in "the WORD is [MASK] ." (what θ0
    reads). Lower is more separated; for syn6 compare entity names with general nouns."""
    import torch

    embeddings = model.get_input_embeddings().weight.detach()
    frames = [f"the {w} is {tokenizer.mask_token} ." for w in words]
    batch = tokenizer(frames, return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    model.train(was_training)
    tokens: set[int] = set()
    pooled = []
    for i, word in enumerate(words):
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        tokens.update(ids)
        pooled.append(hidden[i, 2:2 + len(ids)].mean(0))  # [CLS] the WORD ...
    return {"input": _mean_pairwise_cosine(embeddings[sorted(tokens)]),
            "context": _mean_pairwise_cosine(torch.stack(pooled))}


def _mean_pairwise_cosine(vectors: Any) -> float:
    import torch

    unit = torch.nn.functional.normalize(vectors, dim=-1)
    cos = unit @ unit.T
    n = len(unit)
    return float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))


def type_readout(model: Any, tokenizer: Any, world: dict, domain: str) -> dict[str, float]:
    """Whether the MLM knows each entity's class: the share of `domain`'s entities whose masked
    slot in "the NAME is [MASK] ." puts the most probability on their own class's adjective
    group (`accuracy`; chance is 1 / classes), and the mean probability on any class's group
    (`adjective_mass`). The suite's knowledge written as the corpus states it, read off θ or a
    DAP-trained model without fine-tuning (`scripts/name_binding.py`)."""
    import torch

    perm = world["permutations"][domain]
    entities = world["entities"][domain]
    groups = [tokenizer.convert_tokens_to_ids(world["adjectives"][t]) for t in perm]
    names = sorted(entities)
    batch = tokenizer([f"the {n} is {tokenizer.mask_token} ." for n in names],
                      return_tensors="pt", padding=True)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(**batch).logits
    model.train(was_training)
    rows, cols = (batch["input_ids"] == tokenizer.mask_token_id).nonzero(as_tuple=True)
    probs = logits[rows, cols].softmax(-1)
    scores = torch.stack([probs[:, group].sum(-1) for group in groups], -1)
    gold = torch.tensor([entities[n] for n in names])
    return {"accuracy": float((scores.argmax(-1) == gold).float().mean()),
            "adjective_mass": float(scores.sum(-1).mean()), "chance": 1 / len(perm)}
