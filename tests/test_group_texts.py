"""The companion code's DAP sequences: texts grouped into fixed-length chunks (`group_texts`)."""

import pytest
from datasets import Dataset

from benchmark.basemodel import word_tokenizer
from benchmark.config import ConfigError, build_config
from benchmark.data import group_texts


def reference_group_texts(examples: dict, max_seq_length: int) -> dict:
    """ContinualLM `utils/data.py` l.110-123, restated: concatenate, cut, drop the remainder."""
    concatenated = {k: sum(examples[k], []) for k in examples}
    total = len(concatenated[next(iter(examples))])
    if total >= max_seq_length:
        total = (total // max_seq_length) * max_seq_length
    return {k: [t[i: i + max_seq_length] for i in range(0, total, max_seq_length)]
            for k, t in concatenated.items()}


@pytest.mark.parametrize("n_texts", [3, 1500])  # under one chunk / over one map batch of 1,000
def test_group_texts_matches_the_reference_per_map_batch(tiny_suite, n_texts):
    tok = word_tokenizer(tiny_suite.vocabulary)
    texts = list(tiny_suite.pretrain_corpus["text"][:n_texts])
    grouped = group_texts(Dataset.from_dict({"text": texts}), tok, 32)["input_ids"]
    expected = []
    for start in range(0, len(texts), 1000):  # datasets' default map batch, as the reference's
        ids = tok(texts[start: start + 1000])["input_ids"]
        expected += reference_group_texts({"input_ids": ids}, 32)["input_ids"]
    assert grouped == expected
    if n_texts > 100:
        assert all(len(chunk) == 32 for chunk in grouped)
        # a chunk holds several sentences: [CLS] of more than one text inside most chunks
        cls = tok.cls_token_id
        assert sum(chunk.count(cls) for chunk in grouped) / len(grouped) > 2


def test_group_texts_groups_dap_sequences_and_end_tasks_stay_single_sentences(tiny_suite):
    from accelerate import Accelerator

    from benchmark.context import Context
    from benchmark.data import tokenize_task

    assert not build_config(tiny_suite.defaults).group_texts  # syn6 DAP-trains on sentences
    cfg = build_config(tiny_suite.defaults, flags={"group_texts": True, "max_length": 32})
    tok = word_tokenizer(tiny_suite.vocabulary)
    ctx = Context(config=cfg, suite=tiny_suite, domains=tiny_suite.order(0), model=None,
                  tokenizer=tok, accelerator=Accelerator(cpu=True), run_dir=None)
    chunks = ctx.corpus(0)["input_ids"]
    assert {len(c) for c in chunks} == {32}
    assert sum(c.count(tok.cls_token_id) for c in chunks) > 2 * len(chunks)
    assert {len(c) for c in ctx.general_corpus()["input_ids"]} == {32}
    task = tokenize_task(tiny_suite.domains[ctx.domains[0]].task.train, tok, cfg.max_length)
    assert all(ids.count(tok.cls_token_id) == 1 and ids[0] == tok.cls_token_id
               for ids in task["input_ids"])


def test_group_texts_is_a_boolean_flag():
    from benchmark.__main__ import parser

    assert parser().parse_args(["run", "--group-texts"]).group_texts is True
    assert parser().parse_args(["run", "--no-group-texts"]).group_texts is False
    assert parser().parse_args(["run"]).group_texts is None
    with pytest.raises(ConfigError, match="group_texts must be true or false, got 'yes'"):
        build_config({}, flags={"group_texts": "yes"})
