"""Hostile data input: `data fetch` stays inside the data dir and gives up on a silent server;
empty files, bad bytes and integer labels get one clear line or the right data."""

import http.server
import json
import logging
import threading
from pathlib import Path

import pytest
import yaml
from datasets import Dataset, load_from_disk

from benchmark.__main__ import main
from tasks import SuiteError, load_suite
from tasks.formats import corpus_lines


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CDAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDAP_DATA_MIRROR", raising=False)
    return tmp_path / "data"


def _suite(tmp_path: Path, labels=("yes", "no"), data_labels=None, **extra) -> Path:
    """One domain `news` in a folder nested two deep, so `../../x` leaves it; `extra` is merged
    into the YAML mapping."""
    root = tmp_path / "a" / "b" / "mydata"
    root.mkdir(parents=True)
    (root / "news.txt").write_text("\n".join(f"news text number {k} ." for k in range(20)))
    data_labels = data_labels or labels
    for split, n in (("train", 8), ("test", 4)):
        rows = [json.dumps({"text": f"news {split} {k}", "label": data_labels[k % 2]})
                for k in range(n)]
        (root / f"news-{split}.jsonl").write_text("\n".join(rows) + "\n")
    spec = {"name": "mini", "base_model": "unused-here",
            "domains": {"news": {
                "corpus": {"format": "text", "files": ["news.txt"]},
                "task": {"format": "scibert-jsonl", "labels": list(labels),
                         "train": ["news-train.jsonl"], "test": ["news-test.jsonl"]}}},
            **extra}
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---------------------------------------------------------------- defect 4: data fetch

@pytest.mark.parametrize("bad", ["../../outside.txt", "ABSOLUTE"])
def test_fetch_refuses_a_path_outside_the_data_dir(tmp_path, data_env, capsys, bad):
    source = tmp_path / "source.txt"
    source.write_text("a document\n")
    escaped = tmp_path / "a" / "outside.txt"
    path = bad if bad != "ABSOLUTE" else str(tmp_path / "abs" / "outside.txt")
    suite = _suite(tmp_path)
    spec = yaml.safe_load(suite.read_text())
    spec["domains"]["news"]["corpus"]["files"].append(path)
    spec["files"] = [{"path": path, "url": "https://example.invalid/outside.txt"}]
    suite.write_text(yaml.safe_dump(spec))
    assert main(["data", "fetch", str(suite)]) == 2
    err = _one_line_error(capsys)
    assert str(suite) in err and path in err and "outside the data dir" in err
    assert not escaped.exists() and not (tmp_path / "abs").exists()


def test_fetch_refuses_a_file_url(tmp_path, data_env, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the data dir\n")
    suite = _suite(tmp_path)
    spec = yaml.safe_load(suite.read_text())
    spec["domains"]["news"]["corpus"]["files"].append("copied.txt")
    spec["files"] = [{"path": "copied.txt", "url": secret.as_uri()}]
    suite.write_text(yaml.safe_dump(spec))
    assert main(["data", "fetch", str(suite)]) == 2
    err = _one_line_error(capsys)
    assert str(suite) in err and "files entry 1 (copied.txt)" in err
    assert "is not an http(s) URL" in err
    assert not (suite.parent / "copied.txt").exists()


@pytest.fixture
def silent_server():
    """An http.server on 127.0.0.1 that accepts a request and never answers it."""
    release = threading.Event()

    class Silent(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (the http.server API)
            release.wait(30)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Silent)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    release.set()
    server.shutdown()
    server.server_close()


def test_a_silent_server_times_out_and_leaves_no_part_file(tmp_path, data_env, capsys,
                                                          silent_server):
    import time

    suite = _suite(tmp_path)
    spec = yaml.safe_load(suite.read_text())
    spec["domains"]["news"]["corpus"]["files"].append("remote/corpus.txt")
    spec["files"] = [{"path": "remote/corpus.txt", "url": f"{silent_server}/corpus.txt"}]
    suite.write_text(yaml.safe_dump(spec))
    start = time.monotonic()
    assert main(["data", "fetch", str(suite), "--timeout", "0.5"]) == 2
    assert time.monotonic() - start < 10
    err = _one_line_error(capsys)
    assert "remote/corpus.txt" in err and "no answer within 0.5 s" in err
    assert list((suite.parent / "remote").iterdir()) == []  # no .part file left


# ---------------------------------------------------------------- defect 5: empty data

@pytest.mark.parametrize("empty", ["news.txt", "news-train.jsonl", "news-test.jsonl"])
def test_an_empty_file_stops_the_run_naming_it_and_is_not_cached(tmp_path, data_env, capsys,
                                                                 empty):
    suite = _suite(tmp_path)
    kept = (suite.parent / empty).read_text()
    (suite.parent / empty).write_text("")
    assert main(["run", "--suite", str(suite), "--method", "ncl",
                 "--out", str(tmp_path / "runs"), "--no-table"]) == 2
    err = _one_line_error(capsys)
    assert str(suite.parent / empty) in err and "empty" in err
    saved = [load_from_disk(str(p.parent)) for p in data_env.rglob("state.json")]
    assert all(len(d) > 0 for d in saved)  # no empty dataset left in the cache
    (suite.parent / empty).write_text(kept)
    news = load_suite(str(suite)).domains["news"]
    assert (len(news.corpus), len(news.task.train), len(news.task.test)) == (20, 8, 4)


def test_tokenising_an_empty_dataset_is_an_error(tmp_path):
    from benchmark.basemodel import word_tokenizer
    from benchmark.data import tokenize_corpus

    tokenizer = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a"])
    with pytest.raises(SuiteError, match="the corpus is empty"):
        tokenize_corpus(Dataset.from_dict({"text": []}), tokenizer, 8)


# ---------------------------------------------------------------- defect 7: encodings

def test_one_bad_byte_is_replaced_with_a_warning_not_a_latin1_file(tmp_path, caplog):
    path = tmp_path / "corpus.txt"
    path.write_bytes("naïve café\n".encode() + b"one bad \xff byte\nand \xfe another\n")
    with caplog.at_level(logging.WARNING):
        docs = corpus_lines(path)
    assert docs[0] == "naïve café"  # not "naÃ¯ve cafÃ©"
    assert docs[1] == "one bad \ufffd byte" and docs[2] == "and \ufffd another"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per file, naming it and the first bad line
    assert f"{path}:2: invalid utf-8" in warnings[0] and "2 byte sequence(s)" in warnings[0]


def test_a_files_entry_declares_another_encoding(tmp_path, data_env):
    suite = _suite(tmp_path)
    (suite.parent / "news.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    spec = yaml.safe_load(suite.read_text())
    spec["files"] = [{"path": "news.txt", "encoding": "latin-1"}]
    suite.write_text(yaml.safe_dump(spec))
    assert load_suite(str(suite)).domains["news"].corpus["text"] == ["café crème"]
    spec["files"] = [{"path": "news.txt", "encoding": "latin-42"}]
    suite.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteError, match=r"files entry 1 \(news.txt\): unknown encoding"):
        load_suite(str(suite))


# ---------------------------------------------------------------- defect 8: labels

def test_integer_labels_in_the_yaml_match_integer_labels_in_the_data(tmp_path, data_env):
    suite = _suite(tmp_path, labels=(0, 1))
    task = load_suite(str(suite)).domains["news"].task
    assert task.labels == ["0", "1"] and task.train["label"] == [0, 1] * 4


def test_unquoted_yes_no_labels_are_refused_with_a_clear_line(tmp_path, data_env, capsys):
    suite = _suite(tmp_path)
    suite.write_text(suite.read_text().replace("- 'yes'", "- yes").replace("- 'no'", "- no"))
    assert yaml.safe_load(suite.read_text())["domains"]["news"]["task"]["labels"] == [True, False]
    assert main(["data", "check", str(suite)]) == 2
    err = _one_line_error(capsys)
    assert f"{suite}: domain 'news': task: label True is a bool" in err


# ---------------------------------------------------------------- the typed spec

def test_a_misspelt_key_or_option_names_the_file_and_domain(tmp_path, data_env):
    suite = _suite(tmp_path)
    spec = yaml.safe_load(suite.read_text())
    spec["domains"]["news"]["task"]["epoch"] = 5
    suite.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteError, match=rf"{suite}: domain 'news': task: unknown key\(s\) "
                                         r"\['epoch'\]"):
        load_suite(str(suite))
    del spec["domains"]["news"]["task"]["epoch"]
    spec["domains"]["news"]["corpus"] = {"format": "csv", "colum": "body", "files": ["news.txt"]}
    suite.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteError, match=r"corpus source 1: format csv has no option\(s\) "
                                         r"\['colum'\]; valid: column, header"):
        load_suite(str(suite))
    spec["domains"]["news"]["corpus"] = {"format": "text", "files": ["news.txt"]}
    spec["caps"] = {"train": -1}
    suite.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteError, match=rf"{suite}: caps: train must be a row count"):
        load_suite(str(suite))


def test_the_data_dir_is_an_argument(tmp_path, data_env):
    suite = _suite(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    load_suite(str(suite), data_dir=elsewhere)
    assert list(elsewhere.glob("cache/mini-news-*/corpus/state.json"))
    assert not data_env.exists()  # $CDAP_DATA_DIR is only the default
