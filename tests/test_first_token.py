"""The last layer computed for the first token only (tmkd.teachers.first_token): the same logits as the full
forward, on every architecture it claims, with and without padding; nothing else is touched; and a scorer whose
check fails falls back to the full forward rather than write different labels."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from tmkd.teachers.first_token import FirstTokenLayer, wrap_last_layer


def tiny_config(kind: str, attention: str):
    from transformers import BertConfig, DistilBertConfig, ElectraConfig, RobertaConfig, XLMRobertaConfig

    common = dict(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=80, num_labels=3, pad_token_id=1)
    if kind == "distilbert":
        config = DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3,
                                  max_position_embeddings=80, pad_token_id=1)
    else:
        config = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig,
                  "electra": ElectraConfig}[kind](**common)
    config._attn_implementation = attention
    return config


def tiny_model(kind: str, attention: str = "sdpa"):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(kind, attention), attn_implementation=attention)
    with torch.no_grad():  # random tiny heads give near-zero logits: spread them so a difference shows
        for p in model.parameters():
            p.mul_(3.0)
    return model.eval()


def padded_batch(lengths: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, 99, (len(lengths), width), generator=gen)
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return {"input_ids": torch.where(mask.bool(), ids, 1), "attention_mask": mask}


def last_layer_width(wrapper: FirstTokenLayer, model, batch) -> int:
    """How many positions the wrapped last layer returned (1: the first-token path ran)."""
    seen = []
    handle = wrapper.register_forward_hook(lambda _m, _i, out: seen.append(out.shape[1]))
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta", "electra"])
def test_first_token_last_layer_gives_the_full_forwards_logits(kind, attention):
    model = tiny_model(kind, attention)
    full = copy.deepcopy(model)
    wrapper = wrap_last_layer(model)
    assert isinstance(wrapper, FirstTokenLayer)
    for batch in (padded_batch([17, 3, 9, 17, 1 + 1]), padded_batch([12, 12, 12], seed=1)):  # padded, and not
        assert last_layer_width(wrapper, model, batch) == 1
        with torch.no_grad():
            got, want = model(**batch).logits, full(**batch).logits
        assert want.std(0).max() > 0.05  # the logits follow the input, so a wrong position would show
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            got16, want16 = model(**batch).logits.float(), full(**batch).logits.float()
        assert (got16 - want16).abs().max() < 3e-2


def test_other_architectures_and_training_keep_the_full_layer():
    distil = tiny_model("distilbert")
    before = [type(m) for m in distil.modules()]
    assert wrap_last_layer(distil) is None
    assert [type(m) for m in distil.modules()] == before

    model = tiny_model("bert")
    wrapper = wrap_last_layer(model)
    assert wrap_last_layer(model) is wrapper  # wrapping twice wraps once
    batch = padded_batch([7, 4])
    model.train()  # dropout, and gradients through every position: the full layer
    assert last_layer_width(wrapper, model, batch) == 7
    model.eval()
    with wrapper.full():
        assert last_layer_width(wrapper, model, batch) == 7
    assert last_layer_width(wrapper, model, batch) == 1


def texts(n: int) -> tuple[list[str], list[str]]:
    words = "what is the name of a river city country who where when answer passage long short".split()
    rng = np.random.default_rng(0)
    a = [" ".join(rng.choice(words, rng.integers(2, 8))) for _ in range(n)]
    b = [" ".join(rng.choice(words, rng.integers(3, 40))) for _ in range(n)]
    return a, b


def loaded(folder, **spec):
    from tmkd.teachers.scoring import LoadedTeacher, load_tokenizer
    from tmkd.teachers.spec import TeacherSpec

    tok = load_tokenizer(folder)
    return LoadedTeacher(TeacherSpec(name="t", path=str(folder), max_length=64, **spec), None, folder,
                         torch.device("cpu"), tok), tok


def test_scorer_checks_every_part_and_writes_the_full_forwards_logits(tiny_teachers):
    from tmkd.teachers.scoring import encode_pairs

    folder = tiny_teachers["t1"]
    first, tok = loaded(folder)
    full, _ = loaded(folder, first_token_last_layer=False)
    assert first.first_token is not None and full.first_token is None
    a, b = texts(300)
    widths = []  # positions the wrapped last layer returned, per forward (1: the first-token path ran)
    first.first_token.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    for part in range(2):
        enc = encode_pairs(tok, a[part::2], b[part::2], 64, "longest_first")
        widths.clear()
        passes = first.forward_passes
        np.testing.assert_allclose(first.score(enc), full.score(enc), atol=1e-5, rtol=1e-5)
        # the part's check (this layer, then the full one for reference), then every scoring batch at width 1
        check, scoring = widths[:2], widths[2:]
        assert check[0] == 1 and check[1] > 1
        assert len(scoring) == first.forward_passes - passes > 0 and set(scoring) == {1}
    assert first.first_token_checks == 2 and first.first_token is not None


def test_a_head_that_reads_other_positions_fails_the_check_and_falls_back(tiny_teachers):
    """A model whose head is not what the allow-list says (here: the pooler reads position 1) must not get
    first-token logits: the scorer's check catches it, warns, and scores with the full forward."""
    from tmkd.teachers.scoring import encode_pairs

    folder = tiny_teachers["t2"]
    teacher, tok = loaded(folder)
    reference, _ = loaded(folder, first_token_last_layer=False)
    for scorer in (teacher, reference):
        pooler = scorer.model.bert.pooler
        pooler.forward = lambda h, p=pooler: p.activation(p.dense(h[:, -1]))  # the last position, not the first
    a, b = texts(64)
    enc = encode_pairs(tok, a, b, 64, "longest_first")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = teacher.score(enc)
    assert any("first token only changed the logits" in str(w.message) for w in caught)
    assert teacher.first_token is None
    np.testing.assert_allclose(got, reference.score(enc), atol=1e-5, rtol=1e-5)


def test_the_flag_must_be_a_boolean(tmp_path, tiny_teachers):
    from tmkd.teachers.spec import TeacherError, load_teachers_toml

    toml = tmp_path / "teachers.toml"
    toml.write_text(f'[[teacher]]\nname = "a"\npath = "{tiny_teachers["t1"]}"\nfirst_token_last_layer = "yes"\n')
    with pytest.raises(TeacherError, match="first_token_last_layer"):
        load_teachers_toml(toml)
    toml.write_text(f'[[teacher]]\nname = "a"\npath = "{tiny_teachers["t1"]}"\n')
    assert load_teachers_toml(toml, ["teacher.0.first_token_last_layer=false"])[0].first_token_last_layer is False


def test_the_labels_do_not_depend_on_the_thread_count(tiny_teachers):
    """Workers with different thread counts write bit-identical labels, as with the full layer (the store's
    multi-worker tests compare stores bit for bit). The CPU's SDPA does not give that for a single query row."""
    from tmkd.teachers.scoring import encode_pairs

    a, b = texts(200)
    threads = torch.get_num_threads()
    got = {}
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for flag in (True, False):
                teacher, tok = loaded(tiny_teachers["t3"], first_token_last_layer=flag, cpu_streams=1)
                got[n, flag] = teacher.score(encode_pairs(tok, a, b, 64, "longest_first"))
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(got[1, False], got[2, False])  # the full layer's property, which this one must keep
    assert np.array_equal(got[1, True], got[2, True])


def test_bf16_logits_far_from_zero_pass_the_check(tiny_teachers, monkeypatch):
    """In bf16 a logit near 50 is rounded in steps of 0.25: the check's tolerance grows with the logits, so a
    trained teacher's large logits do not switch the first-token layer off."""
    from tmkd.teachers import scoring
    from tmkd.teachers.device import DeviceInfo
    from tmkd.teachers.scoring import encode_pairs

    monkeypatch.setattr(scoring, "describe", lambda device: DeviceInfo("cpu", bf16=True))  # autocast as if native
    teacher, tok = loaded(tiny_teachers["t1"], dtype="bfloat16", cpu_streams=1)
    full, _ = loaded(tiny_teachers["t1"], dtype="bfloat16", cpu_streams=1, first_token_last_layer=False)
    assert teacher.amp == torch.bfloat16
    for scorer in (teacher, full):
        with torch.no_grad():
            scorer.model.classifier.weight.mul_(200.0)
    a, b = texts(64)
    enc = encode_pairs(tok, a, b, 64, "longest_first")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback would warn
        got = teacher.score(enc)
    want = full.score(enc)
    assert np.abs(want).max() > 20 and teacher.first_token is not None
    np.testing.assert_allclose(got, want, rtol=2**-5, atol=3e-2)

