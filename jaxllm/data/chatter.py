"""TFDS builder `chatter`: chatterbot-corpus conversations for classification and dialogue.

The text is read, offline, from the YAML files that the ``chatterbot-corpus``
package installs (``chatterbot_corpus/data/<language>/<category>.yml``; each
holds a list of conversations, a conversation being a list of turns). Nothing
is copied into this repository. YAML is read with ``yaml.BaseLoader`` so a turn
like ``yes`` or ``1984`` stays the string it is instead of becoming a bool or int.

Configs:

- ``topic`` (classification): one example per English conversation, ``text`` =
  the whole conversation, its turns joined by newlines, ``label`` = the category
  (the file name: ``ai``, ``food``, ``tech_support``, ... 21 classes, heavily
  imbalanced). Whole conversations rather than single turns, because a reply
  such as "Yes." carries no topic and turns of one conversation would otherwise
  be split between train and test.
- ``dialogue``: for every English conversation and every turn after the first,
  ``history`` = up to :data:`HISTORY_TURNS` previous turns (oldest first) and
  ``response`` = that turn.
- ``language`` (language identification): one example per distinct turn of every
  language the corpus ships, ``label`` = the language (the folder name).

``topic`` and ``dialogue`` split by a stable hash of a conversation's first turn,
so conversations that open the same way (the corpus often answers one question
several ways) share a split; ``language`` splits by a hash of the text; both
80/10/10 % (:data:`EVAL_PERCENT`). Entries
that are dropped are counted in the dataset metadata (``skipped``) and logged:
conversations that are not lists (broken YAML in the corpus), exact duplicates,
and texts that occur under two labels (they cannot be classified).
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os

import tensorflow_datasets as tfds
import yaml
from etils import epath

from jaxllm.data.pydocs import SPLITS, normalise_whitespace, stable_split

CONFIGS = ("topic", "dialogue", "language")
HISTORY_TURNS = 4  # previous turns a dialogue example keeps (the corpus rarely has more)
# 80/10/10 rather than pydocs' 90/5/5: with ~900 topic examples, 5 % would leave
# about 45 per eval split, too few to compare runs by.
EVAL_PERCENT = 10
TOPIC_LANGUAGE = "english"


def corpus_root() -> str:
    """The ``data`` folder of the installed chatterbot-corpus package.

    Returns:
      An absolute path.

    Raises:
      ImportError: If chatterbot-corpus is not installed.
    """
    import chatterbot_corpus  # noqa: PLC0415 (only needed while preparing)

    return os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data")


def languages() -> list[str]:
    """Languages the installed corpus ships (folder names), sorted."""
    root = corpus_root()
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))


def categories(language: str = TOPIC_LANGUAGE) -> list[str]:
    """Categories (file stems) of one language, sorted."""
    folder = os.path.join(corpus_root(), language)
    return sorted(f.rsplit(".", 1)[0] for f in os.listdir(folder) if f.endswith((".yml", ".yaml")))


def read_conversations(language: str, skipped: collections.Counter) -> list[tuple[str, list[str]]]:
    """All conversations of one language as (category, turns), in sorted file order.

    Args:
      language: A corpus folder name, e.g. ``english``.
      skipped: Counter to add dropped entries to (``malformed_conversation``,
        ``empty_turn``).

    Returns:
      ``(category, turns)`` pairs with whitespace-normalised, non-empty turns.
    """
    folder = os.path.join(corpus_root(), language)
    out = []
    for category in categories(language):
        name = next(
            f for f in (f"{category}.yml", f"{category}.yaml") if os.path.isfile(f"{folder}/{f}")
        )
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            doc = yaml.load(f, Loader=yaml.BaseLoader) or {}
        for conversation in doc.get("conversations") or []:
            # A few entries in the corpus lost their list markers and are one string.
            if not isinstance(conversation, list) or not all(
                isinstance(t, str) for t in conversation
            ):
                skipped["malformed_conversation"] += 1
                continue
            turns = [normalise_whitespace(t).strip() for t in conversation]
            skipped["empty_turn"] += sum(not t for t in turns)
            turns = [t for t in turns if t]
            if turns:
                out.append((category, turns))
    return out


def _unambiguous(
    examples: list[tuple[str, str, str]], skipped: collections.Counter
) -> list[tuple[str, str, str]]:
    """Keeps one copy of each (text, label); drops texts seen under two labels."""
    labels = collections.defaultdict(set)
    for text, label, _ in examples:
        labels[text].add(label)
    seen, out = set(), []
    for text, label, key in examples:
        if len(labels[text]) > 1:
            skipped["ambiguous_label"] += 1
        elif text in seen:
            skipped["duplicate"] += 1
        else:
            seen.add(text)
            out.append((text, label, key))
    return out


def build_examples(config: str) -> tuple[list[tuple[str, dict]], dict[str, int]]:
    """All examples of one config as (split key, features), and the skip counts.

    Args:
      config: ``topic``, ``dialogue`` or ``language``.

    Returns:
      ``(examples, skipped)``; features use canonical field names.
    """
    skipped = collections.Counter()
    if config == "language":
        rows = [
            (turn, language, turn)
            for language in languages()
            for _, turns in read_conversations(language, skipped)
            for turn in turns
        ]
        examples = [(key, {"text": t, "label": lab}) for t, lab, key in _unambiguous(rows, skipped)]
    elif config == "topic":
        rows = [
            ("\n".join(turns), category, turns[0])
            for category, turns in read_conversations(TOPIC_LANGUAGE, skipped)
        ]
        examples = [(key, {"text": t, "label": lab}) for t, lab, key in _unambiguous(rows, skipped)]
    elif config == "dialogue":
        seen, examples = set(), []
        for _, turns in read_conversations(TOPIC_LANGUAGE, skipped):
            skipped["single_turn_conversation"] += len(turns) == 1
            for i in range(1, len(turns)):
                history = turns[max(0, i - HISTORY_TURNS) : i]
                pair = ("\x00".join(history), turns[i])
                if pair in seen:
                    skipped["duplicate"] += 1
                    continue
                seen.add(pair)
                examples.append((turns[0], {"history": history, "response": turns[i]}))
    else:
        raise ValueError(f"unknown chatter config {config!r}; valid: {', '.join(CONFIGS)}")
    return examples, {k: v for k, v in sorted(skipped.items()) if v}


class Chatter(tfds.core.GeneratorBasedBuilder):
    """chatterbot-corpus conversations: topic and language classification, dialogue."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "topic, dialogue and language configs from chatterbot-corpus."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name="topic", description="English conversation -> category."),
        tfds.core.BuilderConfig(
            name="dialogue", description=f"Up to {HISTORY_TURNS} previous turns -> next turn."
        ),
        tfds.core.BuilderConfig(name="language", description="A turn -> its language."),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "topic"

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # As in pydocs: TFDS would need `importlib_resources` to find the package.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        text = tfds.features.Text()
        name = self.builder_config.name
        if name == "dialogue":
            features = {"id": text, "history": tfds.features.Sequence(text), "response": text}
            supervised = ("history", "response")
        else:
            names = languages() if name == "language" else categories()
            features = {"id": text, "text": text, "label": tfds.features.ClassLabel(names=names)}
            supervised = ("text", "label")
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(features),
            supervised_keys=supervised,
            metadata=tfds.core.MetadataDict(),
            homepage="https://github.com/gunthercox/chatterbot-corpus",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        examples, skipped = build_examples(self.builder_config.name)
        # Kept in the prepared dataset so readers can report what was dropped.
        self.info.metadata["skipped"] = skipped
        if skipped:
            logging.warning("chatter/%s: skipped %s", self.builder_config.name, skipped)
        return {split: self._generate_examples(examples, split) for split in SPLITS}

    def _generate_examples(self, examples, split):
        for index, (key, features) in enumerate(examples):
            if stable_split(key, EVAL_PERCENT) == split:
                # Index in the id: two examples may share a split key (one conversation).
                uid = f"{index}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
                yield uid, {"id": uid, **features}
