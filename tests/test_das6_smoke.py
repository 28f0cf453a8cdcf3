"""das6 end to end on the CPU: the paper's preset on a miniature companion archive.

A temporary folder holds every file the das6 suite reads, under the companion archive's names
and in its formats, a few dozen lines each; a 2-layer x 64 RoBERTa with a byte-level BPE
tokenizer trained on those corpora stands in for roberta-base (`--base-model`). `das` and
`ncl` run through `python -m benchmark run --suite das6 --data-dir ...` with the preset's
loaders, collators, unit gates and per-task fine-tuning, in fp32 and with bf16 autocast; only
sizes are shrunk (DAP steps, DAP batch, importance batches), the optimiser settings are the
paper's. (fp16 autocast is CUDA-only: on a CPU Accelerate runs it in fp32.)
"""

from __future__ import annotations

import gc
import json
import math
import random
from pathlib import Path

import pytest
import torch

from benchmark.__main__ import main
from tasks import SuiteError, load_suite
from tasks.registry import PAPER_ORDERS

# The companion archive's files, as /work/ref/ContinualLM reads them (dataloader/data.py):
# corpora lines 39-105; SemEval14-res line 177; chemprot, citation_intent, sciie lines 210, 268,
# 323 ({train,dev,test}.jsonl); camera lines 425-455; phone lines 505-515 ({train,dev,test}.json).
CORPORA = {
    "restaurant": "yelp_restaurant.txt",
    "acl": "acl_anthology.txt",
    "ai": "ai_corpus.txt",
    "phone": "absa/post_train/phone.txt",
    "pubmed": "format_pubmed_small.txt",
    "camera": "absa/post_train/camera.txt",
}
SPLITS = ("train", "dev", "test")
JSONL_TASKS = {  # folder -> (labels, metadata of a line)
    "citation_intent": (["Uses", "Future", "CompareOrContrast", "Motivation", "Extends",
                         "Background"], {}),
    "sciie": (["FEATURE-OF", "CONJUNCTION", "EVALUATE-FOR", "HYPONYM-OF", "USED-FOR", "PART-OF",
               "COMPARE"], [3, 4, 7, 9]),
    "chemprot": (["DOWNREGULATOR", "SUBSTRATE", "INDIRECT-UPREGULATOR",
                  "INDIRECT-DOWNREGULATOR", "AGONIST", "ACTIVATOR", "PRODUCT-OF",
                  "AGONIST-ACTIVATOR", "INHIBITOR", "UPREGULATOR", "SUBSTRATE_PRODUCT-OF",
                  "AGONIST-INHIBITOR", "ANTAGONIST"], []),
}
BING = ["Bing5Domains/Nokia6610", "Bing9Domains/Nokia6600", "Bing5Domains/CanonG3",
        "Bing5Domains/NikonCoolpix4300", "Bing9Domains/CanonPowerShotSD500",
        "Bing9Domains/CanonS100"]
ARCHIVE_FILES = sorted(
    list(CORPORA.values())
    + [f"SemEval14-res/{s}.json" for s in ("train", "test")]
    + [f"{folder}/{s}.jsonl" for folder in JSONL_TASKS for s in SPLITS]
    + [f"absa/dat/{product}/{s}.json" for product in BING for s in SPLITS])

WORDS = {
    "restaurant": "pasta sushi waiter menu dessert brunch wine table service pizza",
    "acl": "parser corpus annotation treebank alignment translation lexicon tagging",
    "ai": "agent planning reward search inference ontology heuristic classifier",
    "phone": "battery screen signal keypad ringtone charger nokia camera",
    "pubmed": "protein receptor inhibitor kinase enzyme tumor gene expression",
    "camera": "lens zoom flash shutter canon nikon pixels exposure",
}


def _sentence(rng: random.Random, domain: str, n: int = 9) -> str:
    common = "the a of and is was with for this very".split()
    return " ".join(rng.choice(WORDS[domain].split() + common) for _ in range(n)) + " ."


def write_archive(root: Path, rows: int = 16, seed: int = 0) -> None:
    """A miniature companion archive: every das6 file in its real format; corpora of 3 x `rows`
    documents, task train files of `rows` examples (one fine-tuning batch), smaller dev/test."""
    rng = random.Random(seed)
    for domain, rel in CORPORA.items():  # plain text, one document per line
        lines = [_sentence(rng, domain, rng.randint(6, 30)) for _ in range(rows * 3)]
        _write(root / rel, "\n".join(lines) + "\n")
    for split in ("train", "test"):  # SemEval-14 restaurant ASC: {id: {polarity, term, ...}}
        items = {}
        for k in range(rows if split == "train" else rows // 2):
            term = rng.choice(WORDS["restaurant"].split())
            items[f"{k}_{split}"] = {"polarity": ["positive", "neutral", "negative"][k % 3],
                                     "term": term, "id": f"{k}_{split}",
                                     "sentence": f"the {term} {_sentence(rng, 'restaurant')}"}
        _write(root / f"SemEval14-res/{split}.json", json.dumps(items))
    for folder, (labels, metadata) in JSONL_TASKS.items():  # scibert JSON Lines
        domain = {"citation_intent": "acl", "sciie": "ai", "chemprot": "pubmed"}[folder]
        for split in SPLITS:
            n = {"train": rows, "dev": rows // 4, "test": rows // 2}[split]
            lines = []
            for k in range(n):  # relation tasks mark their two entities with << >> and [[ ]]
                text = (f"<< {_sentence(rng, domain, 3)} >> {_sentence(rng, domain)} "
                        f"[[ {_sentence(rng, domain, 2)} ]]")
                lines.append(json.dumps({"text": text, "label": labels[k % len(labels)],
                                         "metadata": metadata}))
            _write(root / f"{folder}/{split}.jsonl", "\n".join(lines) + "\n")
    for product in BING:  # Hu & Liu product reviews as ASC JSON, polarity + / -
        domain = "phone" if "Nokia" in product else "camera"
        for split in SPLITS:
            items = {}
            for k in range(rows // 3 + 1):  # phone: 3 train files, 18 examples before resplit
                term = rng.choice(WORDS[domain].split())
                items[f"{k}"] = {"polarity": "+-"[k % 2], "term": term, "id": f"{k}",
                                 "sentence": f"{_sentence(rng, domain)} {term} ."}
            _write(root / f"absa/dat/{product}/{split}.json", json.dumps(items))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def write_tiny_roberta(archive: Path, folder: Path) -> None:
    """A random 2 x 64 RoBERTa masked LM and a byte-level BPE tokenizer trained on the corpora,
    saved as a model folder for `--base-model`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaForMaskedLM, RobertaTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train([str(archive / rel) for rel in CORPORA.values()], vocab_size=400, min_frequency=1,
              special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    folder.mkdir(parents=True)
    bpe.save_model(str(folder))
    tokenizer = RobertaTokenizerFast(vocab_file=str(folder / "vocab.json"),
                                     merges_file=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2,
                           num_attention_heads=4, intermediate_size=128,
                           max_position_embeddings=200, type_vocab_size=1)
    torch.manual_seed(0)
    RobertaForMaskedLM(config).save_pretrained(folder)


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("das6")
    write_archive(root / "data")
    write_tiny_roberta(root / "data", root / "tiny-roberta")
    return root / "data", root / "tiny-roberta"


@pytest.fixture
def reset_accelerator():
    """Accelerate keeps one state per process and refuses another precision in it; reset it
    between runs at different precisions (as accelerate's own test cases do)."""
    from accelerate.state import AcceleratorState

    yield lambda: AcceleratorState._reset_state(reset_partial_state=True)
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def frozen_heap():
    """Hide the objects alive now (torch, transformers, pytest) from the garbage collector: the
    loop's `Accelerator.free_memory()` runs `gc.collect()` after every DAP phase and fine-tuning,
    and scanning them there was a third of this test's time."""
    gc.freeze()
    yield
    gc.unfreeze()


def test_every_companion_file_is_read(archive, monkeypatch):
    data, _ = archive
    monkeypatch.setenv("CDAP_DATA_DIR", str(data))
    suite = load_suite("das6")
    assert list(suite.domains) == PAPER_ORDERS[0]
    for rel in ARCHIVE_FILES:  # each file is needed: without it the suite names it and stops
        moved = data / (rel + ".away")
        (data / rel).rename(moved)
        try:
            with pytest.raises(SuiteError, match=rf"missing data file .*{rel}"):
                load_suite("das6")
        finally:
            moved.rename(data / rel)


def _run(tmp: Path, data: Path, model: Path, method: str, precision: str) -> dict:
    # sizes only (and the 11 fine-tunings of `diagonal`); every optimiser setting, the per-task
    # epochs and the sequence length stay the preset's
    preset = tmp / "smoke.yaml"
    preset.write_text("dap_batch_size: 8\nimportance_batches: 2\n")
    out = tmp / f"{method}-{precision}"
    assert main(["run", "--suite", "das6", "--data-dir", str(data), "--base-model", str(model),
                 "--method", method, "--mixed-precision", precision, "--dap-steps", "3",
                 "--eval-matrix", "diagonal", "--config", str(preset), "--out", str(out),
                 "--no-table"]) == 0
    return json.loads(next(out.rglob("result.json")).read_text())


def test_das6_runs_das_and_ncl_end_to_end(archive, tmp_path, reset_accelerator, frozen_heap):
    data, model = archive
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    results = {}
    for precision in ("no", "bf16"):
        reset_accelerator()
        for method in ("ncl", "das"):
            results[method, precision] = _run(tmp_path, data, model, method, precision)
    for (method, precision), result in results.items():
        cfg = result["config"]
        assert result["domains"] == PAPER_ORDERS[0] and result["finished"]
        assert (cfg["dap_lr"], cfg["dap_warmup"], cfg["dap_weight_decay"]) == (1e-4, 0.1, 0.0)
        assert (cfg["max_length"], cfg["mlm_probability"]) == (164, 0.15)
        assert (cfg["ft_lr"], cfg["ft_batch_size"], cfg["ft_weight_decay"]) == (3e-5, 16, 0.01)
        assert cfg["mixed_precision"] == precision and cfg["base_model"] == str(model)
        assert [len(row) for row in result["mf1"]] == [1, 2, 3, 4, 5, 6]
        scores = [v for row in result["mf1"] + result["acc"] for v in row if v is not None]
        assert len(scores) == 2 * 11  # A[t][t] after each domain, every task after the last
        assert all(0 <= v <= 100 for v in scores)
        assert all(math.isfinite(x) for losses in result["dap_loss"] for x in losses)
        if method == "ncl":  # the random LM head's first loss: ~ln(vocabulary size)
            assert abs(result["dap_loss"][0][0] - math.log(vocab)) < 1.0
        das_dir = next((tmp_path / f"{method}-{precision}").rglob("result.json")).parent
        if method == "das":  # importance of general knowledge, then of every domain in turn
            names = sorted(p.name for p in (das_dir / "artifacts").glob("importance_*"))
            assert "importance_general.safetensors" in names
            assert [n for n in names if n.startswith("importance_domain")] == [
                f"importance_domain{t}_{d}.safetensors" for t, d in enumerate(PAPER_ORDERS[0])]
    for method in ("ncl", "das"):  # bf16 autocast took effect: same seeds, other losses
        fp32, bf16 = results[method, "no"]["dap_loss"], results[method, "bf16"]["dap_loss"]
        assert fp32 != bf16
        assert abs(fp32[0][0] - bf16[0][0]) < 0.1  # ... but the same computation
    assert results["ncl", "no"]["dap_loss"] != results["das", "no"]["dap_loss"]
