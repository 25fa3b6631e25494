"""The longest input each architecture takes, as every job checks max_length against it (teachers.toml, fine-tuning,
the student): an input of that length runs, one token more fails inside the model; a model without absolute
positions has no limit."""
from __future__ import annotations

import pytest
import torch

from tmkd.teachers.spec import position_limit

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=40)
CASES = {  # model_type: extra config
    "bert": {}, "electra": {}, "roberta": {}, "xlm-roberta": {}, "camembert": {}, "data2vec-text": {},
    "roberta-prelayernorm": {}, "esm": {"position_embedding_type": "absolute", "pad_token_id": 1, "mask_token_id": 2},
    "xmod": {"default_language": "en_XX", "languages": ["en_XX"]},
    "mpnet": {"pad_token_id": 1}, "mpnet-pad0": {"pad_token_id": 0},  # MPNet keeps 2 whatever its pad_token_id
    "roberta-pad3": {"pad_token_id": 3},
    "distilbert": {"dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64},
}


def tiny(case: str):
    from transformers import AutoConfig, AutoModel

    model_type = case.split("-pad")[0]
    config = AutoConfig.for_model(model_type, **{**TINY, **CASES[case]})
    torch.manual_seed(0)
    return AutoModel.from_config(config).eval()


def usable_positions(config: dict) -> int | None:
    limit = position_limit(config)
    return None if limit is None else limit[0]


@pytest.mark.parametrize("case", list(CASES))
def test_usable_positions_is_the_longest_input_the_model_takes(case):
    model = tiny(case)
    n = usable_positions(model.config.to_dict())
    assert n is not None and 30 <= n <= 40
    ids = torch.full((1, n + 1), 5)
    with torch.no_grad():
        model(input_ids=ids[:, :n])
        with pytest.raises((IndexError, RuntimeError)):
            model(input_ids=ids)


def test_models_without_absolute_positions_have_no_limit():
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model("deberta-v2", **TINY, position_biased_input=False, relative_attention=True)
    assert usable_positions(config.to_dict()) is None
    with torch.no_grad():  # and it does take a longer input
        AutoModel.from_config(config).eval()(input_ids=torch.full((1, 60), 5))
    assert usable_positions({"model_type": "esm", "max_position_embeddings": 40,
                             "position_embedding_type": "rotary"}) is None


def test_a_config_without_max_position_embeddings_takes_the_architectures_default():
    """As transformers reads it, so teachers.toml (raw config.json), fine-tuning and the student agree."""
    from transformers import AutoConfig

    raw = {"model_type": "roberta", "pad_token_id": 1}
    default = AutoConfig.for_model("roberta").max_position_embeddings
    assert usable_positions(raw) == default - 2
    assert position_limit(raw)[1] == f"roberta's default max_position_embeddings = {default}, less 2 that roberta " \
                                     "keeps unused"
    assert usable_positions({"model_type": "no-such-architecture"}) is None


def test_a_config_without_pad_token_id_takes_the_architectures_default():
    """markuplm's default padding index is 0, RoBERTa's 1: one or two positions kept unused."""
    assert usable_positions({"model_type": "markuplm", "max_position_embeddings": 40}) == 39
    assert usable_positions({"model_type": "roberta", "max_position_embeddings": 40}) == 38
