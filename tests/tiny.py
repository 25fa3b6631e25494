"""Tiny, locally built Hugging Face models for tests: nothing is downloaded.

A WordPiece tokenizer is trained on the test texts with `tokenizers`, a small BERT is
initialised from a seed, and both are saved with `save_pretrained`, so the code under test
loads them through the same `from_pretrained(path)` calls users run.
"""
from __future__ import annotations

from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED_DATA.exists():  # the project checked out somewhere else: look beside it
    SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def build_tokenizer(texts: list[str], path: Path, vocab_size: int = 400) -> Path:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(texts, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    # The trainer picks the same tokens every time but numbers them in a per-process random order
    # (a Rust hash map), which made the tiny models, and so the toy training tests, differ from one
    # session to the next. Number them deterministically: specials first, then the rest sorted.
    learnt = sorted(set(tok.get_vocab()) - set(specials))
    tok.model = models.WordPiece({t: i for i, t in enumerate(specials + learnt)}, unk_token="[UNK]")
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    fast = BertTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", model_max_length=512,
    )
    path.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(path)
    return path


def build_bert(
    path: Path,
    tokenizer_dir: Path,
    num_labels: int = 2,
    seed: int = 0,
    label_names: list[str] | None = None,
    layers: int = 2,
    hidden: int = 32,
) -> Path:
    """A tiny BertForSequenceClassification saved (safetensors) with its tokenizer beside it."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    names = label_names or [f"LABEL_{i}" for i in range(num_labels)]
    config = BertConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
        intermediate_size=2 * hidden, max_position_embeddings=128, num_labels=num_labels,
        id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)},
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = BertForSequenceClassification(config).eval()
    # Spread the head so that different seeds disagree visibly (random tiny heads are near 0).
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def read_lines(path: Path, n: int) -> list[str]:
    """First ``n`` lines of a (gzipped) text file, as text."""
    import gzip

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        return [line for _, line in zip(range(n), f)]
