"""The job's plan, resolved once: every later step of the recipe reads this object, not the store.

``resolve`` opens the store once, reads each corpus manifest once (``Manifests``), checks teachers,
label spaces and label parts, and fixes the positive class, the teacher weights and, per stage, the
parts and the number of batches of every epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from tmkd.student.config import StageConfig, TrainConfig


class TrainError(Exception):
    """A user-facing problem found while setting up or running training."""


class Manifests(dict):
    """Corpus name -> manifest, each read from the store on first use and never again."""

    def __init__(self, store):
        super().__init__()
        self.store = store

    def __missing__(self, name: str):
        m = self[name] = self.store.corpus(name)  # StoreError naming the known corpora if absent
        return m


def _manifests(store, corpora) -> Manifests:
    return corpora if corpora is not None else Manifests(store)


# ---- setup helpers ----------------------------------------------------------------------------
def label_space(cfg: TrainConfig, store, teachers, corpora: Manifests | None = None) -> list[str]:
    """The task's label names, after checking every teacher and every named corpus agree on them.

    One rule for the whole project (tmkd.data.store.label_space_mismatch): counts match, names match in
    order unless one side has only generic LABEL_i names; a corpus without labels takes any teacher.
    The names returned are the first meaningful ones (a corpus's or a teacher's), for the export.
    """
    from tmkd.data.store import GENERIC_LABEL, LabelSpaceError, StoreError, label_space_mismatch

    for t in teachers[1:]:
        msg = label_space_mismatch(t.name, t.label_names, f"teacher {teachers[0].name!r}", teachers[0].label_names)
        if msg:
            raise LabelSpaceError(msg)
    corpora = _manifests(store, corpora)
    stage_corpora = [c for s in cfg.stages for c in s.corpora]
    labelled: list[tuple[str, list[str]]] = []  # (corpus, label names), each declaring a label space
    for c in dict.fromkeys(stage_corpora + [c for c in (cfg.eval.corpus, cfg.eval.test_corpus) if c]):
        m = corpora[c]  # StoreError naming the known corpora if absent
        if not m.parts:
            raise StoreError(f"corpus {c!r} has no committed parts")
        if m.label_names is None:
            if not teachers and c in stage_corpora:
                raise TrainError(f"corpus {c!r} has no labels and there are no teachers: nothing to learn from "
                                 "(no-KD trains on labelled corpora only)")
            continue
        for t in teachers:
            msg = label_space_mismatch(t.name, t.label_names, f"corpus {c!r}", m.label_names)
            if msg:
                raise LabelSpaceError(msg)
        if not teachers and labelled:  # no-KD: the corpora must agree among themselves, by the same rule
            first, names = labelled[0]
            if label_space_mismatch(first, names, f"corpus {c!r}", m.label_names):
                raise LabelSpaceError(f"corpus {c!r} has labels {m.label_names}, corpus {first!r} has {names} "
                                      "(order matters)")
        labelled.append((c, m.label_names))
    if cfg.eval.corpus and cfg.eval.metric in ("map", "mrr"):
        has_groups = any(store.read_corpus_part(p, ["group"]).column("group").null_count < p.rows
                         for p in corpora[cfg.eval.corpus].parts)
        if not has_groups:
            raise TrainError(f"eval.metric = {cfg.eval.metric!r} ranks candidates by group, but corpus "
                             f"{cfg.eval.corpus!r} has no groups; use accuracy or f1")
    spaces = [t.label_names for t in teachers] + [names for _, names in labelled]
    if not spaces:
        raise TrainError("no label space: without teachers at least one corpus must declare label names")
    meaningful = [n for n in spaces if not any(GENERIC_LABEL.match(x) for x in n)]
    return list((meaningful or spaces)[0])


def positive_class(cfg: TrainConfig, store, label_names: list[str], corpora: Manifests | None = None) -> int | None:
    """Index of the class whose score ranks candidates (MAP/MRR) and whose F1 is reported, found by NAME.

    eval.positive_label, else the eval corpus's declared positive class, else the one label whose name
    means positive; a wrong or ambiguous name is an error before training starts, never a guess. With
    more than two labels and nothing named, None: accuracy and macro F1 need no positive class.
    """
    from tmkd.data.store import StoreError, positive_index

    if not cfg.eval.corpus:
        return None
    m = _manifests(store, corpora)[cfg.eval.corpus]
    names = m.label_names or label_names
    try:
        return positive_index(names, cfg.eval.positive_label, m.positive_label,
                              where=f"eval corpus {cfg.eval.corpus!r}: ")
    except StoreError:
        if cfg.eval.positive_label or m.positive_label or len(names) == 2 or cfg.eval.metric in ("map", "mrr"):
            raise
        return None


def check_labels(store, cfg: TrainConfig, teachers, corpora: Manifests | None = None) -> None:
    """Refuse up front every missing, stale or damaged label part the stages need, naming them.

    Commit records and digests only: each part is decoded and checked in full (ids, finite
    logits) when the stream reads it, so the bytes are not decoded twice."""
    from tmkd.data.store import StaleLabelsError

    corpora = _manifests(store, corpora)
    bad = []
    for stage in cfg.stages:
        for c in stage.corpora:
            for part in corpora[c].parts:
                for t in teachers:
                    chk = store.check_label(t, part, decode=False)
                    if chk.status != "ok":
                        path = store.label_path(t.name, c, part.part)
                        bad.append(f"{path} ({chk.status}{': ' + chk.reason if chk.reason else ''})")
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise StaleLabelsError(
            f"{len(bad)} label part(s) missing, stale or damaged for this run:\n  {shown}\n"
            "score them with `tmkd-label run`, or drop those teachers/corpora from the config"
        )


def check_gold(cfg: TrainConfig, store, corpora: Manifests) -> None:
    """Without teachers a stage learns from gold labels only: refuse one whose corpora have none (a corpus
    may declare label names and hold only null labels), which would train on a loss of 0 and export."""
    gold: dict[str, bool] = {}
    for i, stage in enumerate(cfg.stages):
        for c in stage.corpora:
            if c not in gold:  # the label column of the parts, up to the first part with a label
                gold[c] = any(store.read_corpus_part(p, ["label"]).column("label").null_count < p.rows
                              for p in corpora[c].parts)
        if not any(gold[c] for c in stage.corpora):
            raise TrainError(f"stages.{i} ({stage.name}): corpora {stage.corpora} have no gold labels and there are "
                             "no teachers: nothing to learn from (no-KD trains on labelled rows only)")


def cap_batches(batches: list[int], max_steps: int, ga: int, where: str) -> list[int]:
    """Per-epoch batch counts cut so that the stage runs exactly ``max_steps`` optimizer steps (windows of
    ``ga`` batches, which also end at an epoch's end): the last epoch stops early. A budget met before
    the last epoch, or never met, is a config error: epochs would be empty, or steps asked for not run."""
    capped, left = [], max_steps
    for n in batches:
        steps = min(math.ceil(n / ga), left)
        capped.append(min(n, steps * ga))
        left -= steps
    if left > 0:
        raise TrainError(f"{where}: max_steps = {max_steps} is more than its {len(batches)} epoch(s) hold "
                         f"({max_steps - left} steps); raise epochs")
    if 0 in capped:
        used = capped.index(0)
        raise TrainError(f"{where}: max_steps = {max_steps} is reached in epoch {used} of {len(batches)}; "
                         f"set epochs = {used}")
    return capped


# ---- the plan ---------------------------------------------------------------------------------
@dataclass
class StagePlan:
    """One stage: its config, its corpora's parts and, per epoch, the batches every rank runs."""

    config: StageConfig
    parts: list
    batches: list[int]  # per epoch: the largest count over ranks (shorter ranks pad)
    steps: int  # optimizer steps of the whole stage (accumulation windows)


@dataclass
class Plan:
    cfg: TrainConfig
    store: object
    teachers: list
    corpora: Manifests
    label_names: list[str]
    positive: int | None
    weights: list[float]  # normalised teacher weights ([1.0] without teachers)
    ensemble: bool
    heads: int
    world: int
    num_workers: int
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def eval_parts(self) -> list:
        return self.corpora[self.cfg.eval.corpus].parts if self.cfg.eval.corpus else []

    def record(self, status: str, mixed_precision: str, extra: dict | None = None) -> dict:
        """run.json: variant, teachers + fingerprints, corpora + part digests, config."""
        cfg = self.cfg
        names = dict.fromkeys([c for s in cfg.stages for c in s.corpora]
                              + [c for c in (cfg.eval.corpus, cfg.eval.test_corpus) if c])
        corpora = {c: {"rows": m.rows, "label_names": m.label_names,
                       "parts": [{"part": p.part, "rows": p.rows, "digest": p.digest} for p in m.parts]}
                   for c, m in ((c, self.corpora[c]) for c in names)}
        rec = {
            "status": status,
            "variant": cfg.variant,
            "teachers": [{"name": t.name, "fingerprint": t.fingerprint, "path": t.path, "label_names": t.label_names}
                         for t in self.teachers],
            "teacher_weights": dict(zip(cfg.teachers, cfg.normalised_weights())),
            "corpora": corpora,
            "world_size": self.world,
            "mixed_precision": mixed_precision,
            "config": cfg.to_dict(),
        }
        rec.update(extra or {})
        return rec


def resolve(cfg: TrainConfig, world: int, num_workers: int) -> Plan:
    """Open the store once and fix everything the run reads: a user error here stops it before training."""
    from tmkd.data.store import Store
    from tmkd.student.data import plan_batches

    store = Store(cfg.store)
    teachers = [store.teacher(n) for n in cfg.teachers]
    corpora = Manifests(store)
    label_names = label_space(cfg, store, teachers, corpora)
    positive = positive_class(cfg, store, label_names, corpora)
    check_labels(store, cfg, teachers, corpora)
    if positive is None and any(s.loss.listwise > 0 for s in cfg.stages):
        raise TrainError("loss.listwise ranks candidates by the positive class's log-odds: set eval.corpus "
                         "(and eval.positive_label if the corpus does not declare one)")
    if not teachers:
        check_gold(cfg, store, corpora)
    ensemble = cfg.soft_target == "ensemble"
    ga = cfg.train.gradient_accumulation_steps
    stages = []
    for i, stage in enumerate(cfg.stages):
        parts = [p for c in stage.corpora for p in corpora[c].parts]
        batches = [max(plan_batches(parts, cfg.seed, e, world, num_workers, stage.batch_size))
                   for e in range(stage.epochs)]
        if stage.max_steps:
            batches = cap_batches(batches, stage.max_steps, ga, f"stages.{i} ({stage.name})")
        stages.append(StagePlan(stage, parts, batches, sum(math.ceil(n / ga) for n in batches)))
    return Plan(cfg, store, teachers, corpora, label_names, positive, cfg.normalised_weights() or [1.0], ensemble,
                1 if (ensemble or not teachers) else len(teachers), world, num_workers, stages)
