"""Readers for the real data formats: end tasks and corpora, each failing with file, line and field.

End-task readers return a dict of columns: `text`, optional `text_pair`, `label` (an index into
the label list they are given). Corpus readers return a list of documents (strings). Every
reader names the file and line (or record) of the first malformed item and of any label outside
the label set, so a user with a broken file knows where to look.
"""

from __future__ import annotations

import csv
import json
import logging
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.registry import SuiteError

log = logging.getLogger(__name__)
Columns = dict[str, list[Any]]


class DataFormatError(SuiteError):
    """A data file that does not parse, or holds a label outside the label set."""


def _label_index(labels: list[str], label: Any, where: str) -> int:
    """The index of a data label in the label set, compared as strings (a YAML `[0, 1]` matches
    a JSON `"label": 0`)."""
    if isinstance(label, (dict, list)) or str(label) not in labels:
        raise DataFormatError(
            f"{where}: label {label!r} is not in the label set {list(labels)}")
    return labels.index(str(label))


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A data file's text. Byte sequences invalid in `encoding` become U+FFFD, with one warning
    per file naming it and the first bad line: one bad byte neither stops a run nor silently
    re-decodes the whole file in another encoding. A file that is in another encoding says so
    (`encoding:` on its `files:` entry)."""
    data = Path(path).read_bytes()
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as err:
        text = data.decode(encoding, errors="replace")
        replaced = text.count("\ufffd") - data.decode(encoding, errors="ignore").count("\ufffd")
        log.warning("%s:%d: invalid %s (%d byte sequence(s) in the file replaced by U+FFFD; "
                    "declare the file's `encoding:` if it is not %s)",
                    path, data[: err.start].count(b"\n") + 1, encoding, replaced, encoding)
        return text


def _read_json(path: Path, kind: type, expected: str, encoding: str = "utf-8"):
    """Parse a JSON file whose top level must be `kind`; errors name the file and line."""
    try:
        data = json.loads(read_text(path, encoding))
    except json.JSONDecodeError as err:
        raise DataFormatError(f"{path}:{err.lineno}: malformed JSON ({err.msg})") from None
    if not isinstance(data, kind):
        raise DataFormatError(f"{path}: expected {expected}")
    return data


# ---------------------------------------------------------------- end tasks

def read_scibert_jsonl(path: Path, labels: list[str], encoding: str = "utf-8") -> Columns:
    """scibert-style JSON Lines: one `{"text", "label", "metadata"}` object per line."""
    out: Columns = {"text": [], "label": []}
    for number, line in enumerate(read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{where}: not a JSON object ({err.msg})") from None
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected a JSON object, got {type(item).__name__}")
        for key in ("text", "label"):
            if key not in item:
                raise DataFormatError(f"{where}: missing field {key!r}")
        if not isinstance(item["text"], str):
            raise DataFormatError(f"{where}: field 'text' must be a string")
        out["text"].append(item["text"])
        out["label"].append(_label_index(labels, item["label"], f"{where}: field 'label'"))
    return out


def read_aspect_json(path: Path, labels: list[str], encoding: str = "utf-8") -> Columns:
    """Aspect sentiment JSON `{id: {sentence, term, polarity}}`; input = (aspect, sentence)."""
    data = _read_json(path, dict, "a JSON object {id: example}", encoding)
    out: Columns = {"text": [], "text_pair": [], "label": []}
    for key, item in data.items():
        where = f"{path}: record {key!r}"
        if not isinstance(item, dict):
            raise DataFormatError(f"{where}: expected an object")
        for field in ("sentence", "term", "polarity"):
            if field not in item:
                raise DataFormatError(f"{where}: missing field {field!r}")
        out["text"].append(item["term"])
        out["text_pair"].append(item["sentence"])
        out["label"].append(_label_index(labels, item["polarity"], f"{where}: field 'polarity'"))
    return out


SEG_POLARITY = {"-1": "negative", "0": "neutral", "1": "positive"}


def read_seg(path: Path, labels: list[str], encoding: str = "utf-8") -> Columns:
    """ABSA-PyTorch `.xml.seg`: 3 lines per example (sentence with `$T$`, aspect, -1/0/1)."""
    lines = read_text(path, encoding).splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) % 3:
        raise DataFormatError(
            f"{path}:{len(lines)}: {len(lines)} lines is not a multiple of 3 "
            "(sentence, aspect, polarity)")
    out: Columns = {"text": [], "text_pair": [], "label": []}
    for start in range(0, len(lines), 3):
        sentence, aspect, polarity = (x.strip() for x in lines[start:start + 3])
        if "$T$" not in sentence:
            raise DataFormatError(f"{path}:{start + 1}: sentence has no $T$ placeholder")
        if polarity not in SEG_POLARITY:
            raise DataFormatError(
                f"{path}:{start + 3}: polarity {polarity!r} is not one of -1, 0, 1")
        out["text"].append(aspect)
        out["text_pair"].append(sentence.replace("$T$", aspect))
        label = SEG_POLARITY[polarity]
        out["label"].append(_label_index(labels, label, f"{path}:{start + 3}: polarity"))
    return out


# aspect[+n] / aspect[-n]; extra tags such as [u] [p] [cc] may follow and are ignored
_HU_LIU_OPINION = re.compile(r"([^\[\],]+?)\s*\[([+-])\d*\]")


def read_hu_liu(path: Path, labels: list[str], encoding: str = "utf-8") -> Columns:
    """Raw Hu & Liu / Ding, Liu & Yu product-review annotation, `aspect[+2],x[-1]##sentence`.

    One example per (sentence, aspect, polarity), `+`/`-` only, in file order; the input is the
    (aspect, sentence) pair. Annotations without a sign (`[1]`) or with a broken bracket
    (`[+1}`) carry no polarity we can trust: they are skipped with a warning naming the line.
    """
    out: Columns = {"text": [], "text_pair": [], "label": []}
    for number, line in enumerate(read_text(path, encoding).splitlines(), start=1):
        if "##" not in line or line.startswith(("*", "[t]")):
            continue
        left, sentence = line.split("##", 1)
        sentence = sentence.strip()
        seen: set[tuple[str, str]] = set()
        for match in _HU_LIU_OPINION.finditer(left):
            key = (match.group(1).strip(), match.group(2))
            if key in seen:
                continue
            seen.add(key)
            out["text"].append(key[0])
            out["text_pair"].append(sentence)
            out["label"].append(_label_index(labels, key[1], f"{path}:{number}: polarity"))
        rest = _HU_LIU_OPINION.sub("", left)
        if re.search(r"\[[+-]?\d", rest):
            log.warning("%s:%d: skipped a malformed annotation in %r", path, number, left.strip())
    return out


TASK_READERS: dict[str, Callable[..., Columns]] = {
    "scibert-jsonl": read_scibert_jsonl,
    "aspect-json": read_aspect_json,
    "seg": read_seg,
    "hu-liu": read_hu_liu,
}


def read_task_files(fmt: str, files: list[tuple[Path, str]], labels: tuple[str, ...]) -> Columns:
    """Concatenate several (path, encoding) files of one format (e.g. camera's three test
    products); a file without a single example is an error naming it."""
    out: Columns = {}
    for path, encoding in files:
        part = TASK_READERS[fmt](path, list(labels), encoding)
        if not part.get("label"):
            raise DataFormatError(f"{path}: no {fmt} examples in the file (empty?)")
        for key, values in part.items():
            out.setdefault(key, []).extend(values)
    return out


# ---------------------------------------------------------------- corpora
# Each reader takes the path and encoding, then its options as keyword-only arguments: those are
# the options a suite may give a corpus source of that format (tasks/spec.py reads them here).

def corpus_lines(path: Path, encoding: str = "utf-8") -> list[str]:
    """Plain text, one document per line (blank lines skipped)."""
    return [line.strip() for line in read_text(path, encoding).splitlines() if line.strip()]


def corpus_jsonl(path: Path, encoding: str = "utf-8", *, field: str = "text") -> list[str]:
    """JSON Lines, the document in `field`."""
    docs = []
    for number, line in enumerate(read_text(path, encoding).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataFormatError(f"{path}:{number}: not a JSON object ({err.msg})") from None
        if not isinstance(item, dict) or field not in item:
            raise DataFormatError(f"{path}:{number}: missing field {field!r}")
        if item[field]:
            docs.append(str(item[field]).strip())
    return docs


def corpus_csv(path: Path, encoding: str = "utf-8", *, column: str | int | list = 0,
               header: bool = True) -> list[str]:
    """CSV rows; `column` is a header name or 0-based index, or a list of them to join."""
    columns = column if isinstance(column, list) else [column]
    rows = csv.reader(read_text(path, encoding).splitlines())
    names: list[str] = next(rows, []) if header else []
    indices = []
    for col in columns:
        if isinstance(col, int):
            indices.append(col)
        elif col in names:
            indices.append(names.index(col))
        else:
            raise DataFormatError(f"{path}:1: no column {col!r} in the header {names}")
    docs = []
    for number, row in enumerate(rows, start=2 if header else 1):
        if not row:
            continue
        if max(indices) >= len(row):
            raise DataFormatError(
                f"{path}:{number}: row has {len(row)} fields, column {max(indices)} is missing")
        text = " ".join(row[i].strip() for i in indices if row[i].strip())
        if text:
            docs.append(text)
    return docs


def corpus_review_json(path: Path, encoding: str = "utf-8", *,
                       field: str = "amazon_reviews") -> list[str]:
    """A JSON list of products, each with a list of review texts in `field`."""
    data = _read_json(path, list, "a JSON list of products", encoding)
    docs = []
    for k, item in enumerate(data):
        if not isinstance(item, dict) or not isinstance(item.get(field, []), list):
            raise DataFormatError(f"{path}: product {k}: field {field!r} must be a list")
        docs += [str(r).strip() for r in item.get(field, []) if str(r).strip()]
    return docs


def corpus_anthology_xml(path: Path, encoding: str = "utf-8") -> list[str]:
    """ACL Anthology XML: the text of every `<abstract>` (inline markup flattened). The file's
    XML declaration, not `encoding`, says how it is decoded."""
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DataFormatError(f"{path}:{err.position[0]}: malformed XML ({err})") from None
    docs = []
    for abstract in root.iter("abstract"):
        text = " ".join("".join(abstract.itertext()).split())
        if text:
            docs.append(text)
    return docs


def corpus_pubtator(path: Path, encoding: str = "utf-8") -> list[str]:
    """PubTator: `PMID|t|title` and `PMID|a|abstract` lines; one document per PMID."""
    docs: dict[str, list[str]] = {}
    for line in read_text(path, encoding).splitlines():
        parts = line.split("|", 2)
        if len(parts) == 3 and parts[1] in ("t", "a"):
            docs.setdefault(parts[0], []).append(parts[2].strip())
    return [" ".join(p for p in parts if p) for parts in docs.values()]


def corpus_pubmedqa(path: Path, encoding: str = "utf-8") -> list[str]:
    """PubMedQA `{PMID: {QUESTION, CONTEXTS: [...], LONG_ANSWER}}`: the abstract per PMID."""
    data = _read_json(path, dict, "a JSON object {PMID: record}", encoding)
    docs = []
    for pmid, item in data.items():
        if not isinstance(item, dict) or not isinstance(item.get("CONTEXTS"), list):
            raise DataFormatError(f"{path}: record {pmid!r}: missing list field 'CONTEXTS'")
        parts = [*item["CONTEXTS"], item.get("LONG_ANSWER", "")]
        docs.append(" ".join(p.strip() for p in parts if p and p.strip()))
    return docs


def corpus_wikitext(path: Path, encoding: str = "utf-8") -> list[str]:
    """WikiText (Merity et al. 2016): one paragraph per line; blank lines and lines starting
    with `=` (the ` = Title = `, ` = = Section = = ` headings) skipped."""
    lines = (line.strip() for line in read_text(path, encoding).splitlines())
    return [text for text in lines if text and not text.startswith("=")]


CORPUS_READERS: dict[str, Callable[..., list[str]]] = {
    "text": corpus_lines,
    "jsonl": corpus_jsonl,
    "csv": corpus_csv,
    "review-json": corpus_review_json,
    "anthology-xml": corpus_anthology_xml,
    "pubtator": corpus_pubtator,
    "pubmedqa": corpus_pubmedqa,
    "wikitext": corpus_wikitext,
}


# A corpus document longer than this is cut to it (with a warning): a DAP sequence reads
# max_length tokens of a document (or of the grouped corpus), and the tokenizer's memory grows
# with the longest one: a 50 MB line took a run to a 5.3 GB peak. A full paper is ~60k.
MAX_DOC_CHARS = 1_000_000


def cap_documents(docs: list[str], source: object) -> list[str]:
    """`docs` with each cut to `MAX_DOC_CHARS` characters; one warning names `source`."""
    long = [k for k, d in enumerate(docs) if len(d) > MAX_DOC_CHARS]
    if long:
        log.warning("%s: %d document(s) longer than %d characters cut to that length (the "
                    "first: document %d, %d characters)", source, len(long), MAX_DOC_CHARS,
                    long[0] + 1, len(docs[long[0]]))
        docs = [d[:MAX_DOC_CHARS] for d in docs]
    return docs


def read_corpus_files(fmt: str, files: list[tuple[Path, str]], **options: Any) -> list[str]:
    """The documents of several (path, encoding) files of one format; a file without a single
    document is an error naming it; documents over `MAX_DOC_CHARS` are cut (a warning)."""
    docs: list[str] = []
    for path, encoding in files:
        part = CORPUS_READERS[fmt](path, encoding, **options)
        if not part:
            raise DataFormatError(f"{path}: no {fmt} documents in the file (empty?)")
        docs += cap_documents(part, path)
    return docs


def read_hf_corpus(source: str, split: str = "train", field: str = "text") -> list[str]:
    """A Hugging Face `datasets` id (from the local hub cache) or a local dataset directory."""
    import datasets

    path = Path(source)
    try:
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(source, split=split)
    except Exception as err:  # datasets raises many kinds; the user needs the source named
        raise SuiteError(f"cannot load dataset {source!r}: {err}") from err
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise SuiteError(f"dataset {source!r} has no split {split!r}; has {list(data)}")
        data = data[split]
    if field not in data.column_names:
        raise SuiteError(f"dataset {source!r} has no column {field!r}; has {data.column_names}")
    docs = [t for t in data[field] if t and t.strip()]
    if not docs:
        raise DataFormatError(f"dataset {source!r}: no documents in column {field!r} (empty?)")
    return cap_documents(docs, f"dataset {source!r}")
