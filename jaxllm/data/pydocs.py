"""TFDS builder `pydocs`: Python's own documentation as a language-modelling corpus.

The text is produced offline from what the running Python ships, so the default
corpus works on a fresh machine without a network:

- every topic of ``pydoc_data.topics.topics`` (the language reference pages that
  ``help('assert')`` shows), one document each;
- docstrings of the standard library, read with :mod:`ast` from the ``.py`` files
  under ``sysconfig.get_paths()['stdlib']`` (modules are never imported): one
  document per module docstring, one per top-level class (its docstring followed
  by its methods' docstrings) and one per top-level function.

Tests, IDLE, demos and installed packages are skipped. Documents are written in
sorted order and each goes to ``train`` / ``validation`` / ``test`` (90/5/5 %) by
a stable hash of its id (:func:`stable_split`), so the corpus and its split are
a pure function of the Python version. Because the stdlib differs between Python
versions, the builder config is named after the version (``py311``), which keeps
the prepared data of two Pythons apart instead of silently reusing a stale one.
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sys
import sysconfig
from collections.abc import Iterator

import tensorflow_datasets as tfds
from etils import epath

SPLITS = ("train", "validation", "test")

# Directory names under the stdlib that hold tests, demos, GUIs or third-party code.
_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idlelib",
        "site-packages",
        "dist-packages",
        "__pycache__",
        "turtledemo",
        "lib-dynload",
        "ensurepip",
        "__phello__",
    }
)
# Test fixtures and jokes that sit directly in the stdlib root.
_SKIP_MODULES = frozenset({"__hello__", "antigravity", "this"})
_CONTROL_CHARS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_MANY_BLANK_LINES = re.compile(r"\n{3,}")


def stable_split(key: str, eval_percent: int = 5) -> str:
    """Assigns a document to a split by a stable hash of its key (90/5/5 % by default).

    The same rule splits local text files (keyed by a hash of the text), so a
    document lands in the same split on every machine, run and process.

    Args:
      key: A document id.
      eval_percent: Percent of keys for each of ``validation`` and ``test``.

    Returns:
      ``"train"``, ``"validation"`` or ``"test"``.
    """
    bucket = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % 100
    # 5 % rather than 1-2 %: the corpus is small (~0.75M tokens), and an eval of a
    # few thousand tokens would be too noisy to compare runs by.
    if bucket < eval_percent:
        return "test"
    if bucket < 2 * eval_percent:
        return "validation"
    return "train"


def normalise_whitespace(text: str) -> str:
    """Normalises line endings and spacing while keeping paragraphs and indentation.

    Tabs become spaces, control characters go, trailing spaces are stripped and
    runs of blank lines collapse to one, so paragraph breaks (and indented code
    examples) survive but invisible whitespace noise does not reach the tokenizer.

    Args:
      text: Raw text.

    Returns:
      The normalised text, without leading or trailing blank lines.
    """
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(8)
    text = _CONTROL_CHARS.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return _MANY_BLANK_LINES.sub("\n\n", text).strip("\n")


def config_name() -> str:
    """Name of the builder config for the running Python, e.g. ``py311``."""
    return f"py{sys.version_info.major}{sys.version_info.minor}"


def _stdlib_files(root: str) -> Iterator[tuple[str, str]]:
    """Yields (dotted module name, path) for stdlib sources, in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        # Sorting in place fixes the walk order; pruning here skips whole trees.
        # A '-' cannot be in a package name (config-3.11-x86_64-linux-gnu, ...).
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in _SKIP_DIRS and not d.startswith(("config-", ".")) and "-" not in d
        )
        rel = os.path.relpath(dirpath, root)
        package = [] if rel == "." else rel.split(os.sep)
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            stem = name[:-3]
            parts = package if stem == "__init__" else [*package, stem]
            if parts and parts[0] not in _SKIP_MODULES:
                yield ".".join(parts), os.path.join(dirpath, name)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, owner: str = "") -> str:
    """``def name(args)`` for a function, ``Owner.name(args)`` for a method."""
    if owner:
        return f"{owner}.{node.name}({ast.unparse(node.args)})"
    prefix = "async def" if isinstance(node, ast.AsyncFunctionDef) else "def"
    return f"{prefix} {node.name}({ast.unparse(node.args)})"


def _class_text(module: str, node: ast.ClassDef) -> str | None:
    """A class document: its header and docstring, then its documented methods."""
    bases = ", ".join(ast.unparse(b) for b in [*node.bases, *node.keywords])
    parts = []
    doc = ast.get_docstring(node)
    if doc:
        parts.append(doc)
    for child in node.body:
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
            method_doc = ast.get_docstring(child)
            if method_doc:
                parts.append(f"{_signature(child, node.name)}\n\n{method_doc}")
    if not parts:
        return None
    header = f"class {node.name}({bases})" if bases else f"class {node.name}"
    return "\n\n".join([f"{header} in module {module}", *parts])


def _module_documents(module: str, path: str) -> Iterator[tuple[str, str]]:
    """Yields (id, text) for one stdlib file; unparsable files yield nothing."""
    try:
        with open(path, "rb") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return  # e.g. deliberately broken grammar fixtures; not documentation
    doc = ast.get_docstring(tree)
    if doc:
        yield f"module:{module}", f"Module {module}\n\n{doc}"
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            text = _class_text(module, node)
            if text:
                yield f"class:{module}.{node.name}", text
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc:
                yield (
                    f"function:{module}.{node.name}",
                    f"{_signature(node)} in module {module}\n\n{doc}",
                )


def iter_documents(stdlib: str | None = None) -> Iterator[tuple[str, str]]:
    """Yields every pydocs document as (id, normalised text), in a fixed order.

    Args:
      stdlib: Standard-library directory; defaults to the running Python's.

    Yields:
      ``(id, text)`` pairs: topics first (sorted), then stdlib files (sorted).
    """
    from pydoc_data.topics import topics  # noqa: PLC0415 (only needed while preparing)

    seen = set()
    for name in sorted(topics):
        text = normalise_whitespace(topics[name])
        if text:
            seen.add(f"topic:{name}")
            yield f"topic:{name}", text
    for module, path in _stdlib_files(stdlib or sysconfig.get_paths()["stdlib"]):
        for doc_id, text in _module_documents(module, path):
            text = normalise_whitespace(text)
            if text and doc_id not in seen:  # a name defined twice keeps its first definition
                seen.add(doc_id)
                yield doc_id, text


class Pydocs(tfds.core.GeneratorBasedBuilder):
    """Python documentation text (pydoc topics + stdlib docstrings) for LM training."""

    # Fixed so a prepared copy is found and reused; bump it when the text changes.
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "pydoc topics and stdlib docstrings, 90/5/5 hash split."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(
            name=config_name(), description=f"Documentation of Python {sys.version.split()[0]}."
        )
    ]

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS derives this from the package via `importlib_resources`, which is not
        # installed here; the file itself is all it needs (to look for checksums).
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict(
                {"id": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            homepage="https://docs.python.org/3/",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        documents = list(iter_documents())
        return {split: self._generate_examples(documents, split) for split in SPLITS}

    def _generate_examples(self, documents, split):
        for doc_id, text in documents:
            if stable_split(doc_id) == split:
                yield doc_id, {"id": doc_id, "text": text}
