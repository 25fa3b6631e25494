"""Evaluation: on the dev corpus after every epoch (split over ranks, gathered, scored once), and of the
exported model on the test corpus, once, at the end."""
from __future__ import annotations


def predict(forward, batches, device, num_labels: int) -> tuple:
    """(logits [rows, labels], gold labels, groups) of every batch, ``forward`` mapping the batch's model inputs
    on ``device`` to logits. Inputs go over without blocking and the logits are read back once, after the loop:
    no host wait per batch."""
    import numpy as np
    import torch

    from tmkd.student.data import INPUTS
    from tmkd.teachers.device import to_device

    logits, gold, groups = [], [], []
    for batch, labels, grp in batches:
        logits.append(forward({k: to_device(batch[k], device) for k in INPUTS if k in batch}).float())
        gold.append(labels)
        groups += grp
    return (torch.cat(logits).cpu().numpy() if logits else np.zeros((0, num_labels), np.float32),
            np.concatenate(gold) if gold else np.zeros(0, np.int64), groups)


def evaluate(accelerator, model, plan, tokenizer) -> dict:
    """accuracy, F1, MAP/MRR (with the plan's positive class) of the mean of the heads on the eval corpus."""
    import numpy as np
    import torch

    from tmkd.student.data import eval_batches
    from tmkd.teachers.metrics import evaluate_predictions

    cfg = plan.cfg
    parts = plan.eval_parts[accelerator.process_index :: accelerator.num_processes]
    net = accelerator.unwrap_model(model)
    net.eval()
    with torch.no_grad(), accelerator.autocast():  # one context: weights are cast once, not per batch
        local = predict(lambda inputs: net(**inputs).float().mean(dim=1),
                        eval_batches(plan.store, parts, tokenizer, cfg.student.max_length, cfg.eval.batch_size),
                        accelerator.device, net.num_labels)
    net.train()
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        allp = gather_object([local])
        local = (np.concatenate([p[0] for p in allp]), np.concatenate([p[1] for p in allp]),
                 [g for p in allp for g in p[2]])
    return evaluate_predictions(local[0], local[1], local[2], plan.positive)


def evaluate_export(folder, plan, corpus: str, device) -> dict:
    """The exported model (a stock Hugging Face folder, loaded as a user loads it) scored on ``corpus``."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tmkd.student.data import eval_batches
    from tmkd.teachers.metrics import evaluate_predictions

    cfg = plan.cfg
    model = AutoModelForSequenceClassification.from_pretrained(folder).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with torch.no_grad():
        logits, gold, groups = predict(lambda inputs: model(**inputs).logits,
                                       eval_batches(plan.store, plan.corpora[corpus].parts, tokenizer,
                                                    cfg.student.max_length, cfg.eval.batch_size),
                                       device, model.config.num_labels)
    return evaluate_predictions(logits, gold, groups, plan.positive)
