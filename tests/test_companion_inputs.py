"""Run options that reproduce the companion's inputs and optimiser (ContinualLM 57e498c): each
recomputes the companion's construction literally and rejects this package's default form."""

import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset, load_dataset
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import BertConfig, BertForMaskedLM, RobertaTokenizerFast

from benchmark import finetune
from benchmark.basemodel import word_tokenizer
from benchmark.config import ConfigError, build_config
from benchmark.context import Context
from benchmark.data import skip_start, tokenize_task
from methods.modeling import encoder_of

ASPECTS = {"1": {"term": "battery life", "sentence": "The battery life is great", "polarity": "p"},
           "2": {"term": "screen", "sentence": "screen too dim at noon", "polarity": "n"}}


def roberta_style_tokenizer() -> RobertaTokenizerFast:
    """A small byte-level BPE with RoBERTa's template (<s> a </s></s> b </s>), trained here."""
    bpe = ByteLevelBPETokenizer()
    texts = [f"{v['term']} {v['sentence']}" for v in ASPECTS.values()] * 5
    bpe.train_from_iterator(texts, vocab_size=300, min_frequency=1, show_progress=False,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return RobertaTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>",
                                eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                unk_token="<unk>", pad_token="<pad>", mask_token="<mask>")


def test_pair_input_companion_is_the_companions_aspect_string():
    tokenizer = roberta_style_tokenizer()
    split = Dataset.from_dict({"text": [v["term"] for v in ASPECTS.values()],
                               "text_pair": [v["sentence"] for v in ASPECTS.values()],
                               "label": [0, 1]})
    # ContinualLM dataloader/data.py l.179-181, literally
    data, text = ASPECTS, []
    for _data in data:
        text.append(
            data[_data]['term'] + ' ' + tokenizer.sep_token + data[_data]['sentence'])
    expected = tokenizer(text, truncation=True, max_length=32)["input_ids"]
    ours = tokenize_task(split, tokenizer, 32, pair_input="companion")["input_ids"]
    assert ours == expected
    pair = tokenize_task(split, tokenizer, 32)["input_ids"]  # the default: a text pair
    assert pair != expected and pair[0].count(tokenizer.sep_token_id) == 3
    assert ours[0].count(tokenizer.sep_token_id) == 2


def test_corpus_skip_is_the_companions_train_5_percent_split(tmp_path):
    floor_misses = half_up_misses = 0  # wrong cuts: int(n·5/100), and ties rounded up
    for rows in (10, 30, 50, 99, 130):  # 0.5, 1.5, 2.5, 4.95, 6.5 rows
        path = tmp_path / f"corpus{rows}.txt"
        path.write_text("".join(f"line {i}\n" for i in range(rows)))
        # ContinualLM dataloader/data.py l.44-47, --validation_split_percentage 5 (config.py
        # l.199-202)
        validation_split_percentage = 5
        data_files = {'train': str(path)}
        reference = load_dataset('text', data_files=data_files,
                                 split=f"train[{validation_split_percentage}%:]",
                                 cache_dir=str(tmp_path / "cache"))["text"]
        corpus = Dataset.from_dict({"text": [f"line {i}" for i in range(rows)]})
        assert skip_start(corpus, 0.05)["text"] == reference
        assert skip_start(corpus, 0.0)["text"] == corpus["text"]
        floor_misses += corpus["text"][rows * 5 // 100:] != reference
        half_up_misses += corpus["text"][int(rows * 5 / 100 + 0.5):] != reference
    assert floor_misses and half_up_misses


def test_corpus_skip_leaves_out_the_start_of_every_domain_corpus(tiny_suite, tmp_path):
    tokenizer = word_tokenizer(tiny_suite.vocabulary)
    cfg = build_config(tiny_suite.defaults, None, {"corpus_skip": 0.05})
    ctx = Context(config=cfg, suite=tiny_suite, domains=tiny_suite.order(0), model=None,
                  tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path)
    raw = tiny_suite.domains[ctx.domains[1]].corpus
    start = round(0.05 * len(raw))
    first = tokenizer(raw[start]["text"], truncation=True, max_length=cfg.max_length)
    assert ctx.corpus(1)[0]["input_ids"] == first["input_ids"]
    assert len(ctx.corpus(1)) == len(raw) - start
    with pytest.raises(ConfigError, match="corpus_skip must be a share in"):
        build_config(tiny_suite.defaults, None, {"corpus_skip": 1.0})


class Recorder(torch.optim.AdamW):
    made: list = []

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        Recorder.made.append(self)


@pytest.mark.parametrize("form", ["weights", "all"])
def test_fine_tuning_optimiser_decay_and_eps(tiny_suite, tmp_path, monkeypatch, form):
    tokenizer = word_tokenizer(tiny_suite.vocabulary)
    model = BertForMaskedLM(BertConfig(vocab_size=len(tokenizer), hidden_size=16,
                                       num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=16, max_position_embeddings=32))
    cfg = build_config(tiny_suite.defaults, None, {"ft_decay_params": form, "adam_eps": 1e-6})
    ctx = Context(config=cfg, suite=tiny_suite, domains=tiny_suite.order(0), model=model,
                  tokenizer=tokenizer, accelerator=Accelerator(cpu=True), run_dir=tmp_path)
    task = tiny_suite.domains[ctx.domains[0]].task
    split = tokenize_task(task.train.select(range(8)), tokenizer, 16)
    Recorder.made = []
    monkeypatch.setattr(torch.optim, "AdamW", Recorder)
    built = []
    real = finetune.task_model
    monkeypatch.setattr(finetune, "task_model", lambda e, n: built.append(real(e, n)) or built[-1])
    finetune.finetune_and_test(ctx, encoder_of(model), split, split, task.num_labels, seed=0,
                               desc="t", epochs=1)
    optimizer, classifier = Recorder.made[0], built[0]
    decay = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    assert {g["eps"] for g in optimizer.param_groups} == {1e-6}
    # the companion (approaches/finetune.py l.44-45), literally: AdamW(filter(lambda p:
    # p.requires_grad, model.parameters()), lr=..., weight_decay=args.weight_decay)
    companion = {id(p): cfg.ft_weight_decay
                 for p in filter(lambda p: p.requires_grad, classifier.parameters())}
    assert set(decay) == set(companion)
    assert (decay == companion) == (form == "all")  # rejected: biases/LayerNorm left undecayed
