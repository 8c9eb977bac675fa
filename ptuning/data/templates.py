"""Prompt templates: one fact becomes one row of token ids, pseudo-token slots, and the position that predicts the
object.

P-tuning, masked LMs (the paper's order, subject BEFORE the mask):
    [CLS] P*t0 subject P*t1 [MASK] P*t2 [SEP]          ('.' before [SEP] when t2 == 0, as the reference did)
P-tuning, causal LMs (the object is the next token; t2 must be 0):
    P*t0 subject P*t1                                   -> logits of the LAST position score the object
With anchors, each segment's pseudo tokens are followed by the manual template's words for that segment, e.g.
    [CLS] P*t0 subject P*t1 "was born in" [MASK] P*t2 "." [SEP]
Manual prompts render the LAMA template as text ("[X] was born in [Y] .") and tokenize it whole; causal LMs take
the text before [Y].

Causal rows are scored at their last position; no label is handed to a model that shifts labels internally.

The reference protocol's template quirks (config.ProtocolConfig) are choices made here:
    mask_before_subject   [CLS] P*t0 [MASK] P*t1 subject P*t2 [SEP]   (masked LMs; no anchors in that order)
    causal_loss_shift     training rows of causal LMs are scored one position early (L-2), evaluation rows at L-1
    bpe_spaces            '.' (not 'Ġ.') closes a masked row with t2 == 0; manual prompts start with a space and,
                          for causal LMs, keep the space before [Y] (a lone 'Ġ' token, whose position is scored)
"""
from __future__ import annotations

from dataclasses import dataclass

from ptuning.data.vocab import encode_in_context


class TemplateError(ValueError):
    pass


@dataclass(frozen=True)
class Row:
    ids: tuple[int, ...]  # token ids; pseudo slots hold a placeholder id that the prompt vectors replace
    pseudo: tuple[int, ...]  # per position: which pseudo token (0..n-1) sits there, or -1
    target: int  # the position whose logits predict the object
    label: int  # the object's token id


def split_manual(template: str) -> tuple[str, str, str]:
    """'[X] was born in [Y] .' -> ('', 'was born in', '.'): the words before [X], between, after [Y]."""
    before, rest = template.split("[X]", 1)
    if "[Y]" not in rest:
        raise TemplateError(f"manual template {template!r}: [Y] must follow [X]")
    middle, after = rest.split("[Y]", 1)
    return before.strip(), middle.strip(), after.strip()


def default_counts(kind: str) -> tuple[int, int, int]:
    return (3, 3, 3) if kind == "masked" else (3, 3, 0)


class Templates:
    """Which template a unit gets, from the run's settings and the unit's own (its variant's): the manual prompt's,
    or its P-tuning template."""

    def __init__(self, tokenizer, kind: str, cfg):
        self.tokenizer, self.kind, self.cfg = tokenizer, kind, cfg  # cfg: the run's settings

    def counts(self, cfg) -> tuple[int, int, int]:
        """A unit's pseudo tokens before the subject, between subject and object, after the object."""
        return tuple(cfg.prompt.template or default_counts(self.kind))

    def manual(self, task, cfg=None) -> "ManualTemplate":
        """The manual prompt's template (cfg: a unit's own settings, for the rows it fine-tunes on)."""
        protocol = (cfg or self.cfg).protocol
        return ManualTemplate(self.tokenizer, self.kind, task.info.template, add_bos=self.cfg.model.add_bos,
                              causal_loss_shift=protocol.causal_loss_shift, bpe_spaces=self.cfg.protocol.bpe_spaces)

    def ptuning(self, task, cfg) -> "PTuningTemplate":
        """A unit's P-tuning template, from its own settings (cfg: its variant's)."""
        return PTuningTemplate(self.tokenizer, self.kind, self.counts(cfg), task.info.template,
                               anchors=cfg.prompt.anchors, add_bos=cfg.model.add_bos,
                               mask_before_subject=cfg.protocol.mask_before_subject,
                               causal_loss_shift=cfg.protocol.causal_loss_shift, bpe_spaces=cfg.protocol.bpe_spaces)

    def training(self, task, cfg):
        """The template a unit trains with: its P-tuning template, or the manual one when only the LM trains."""
        return self.ptuning(task, cfg) if cfg.train.uses_prompts else self.manual(task, cfg)

    def check(self, configs: list, task) -> None:
        """Every variant's template builds for this model (a combination it refuses, such as anchors with the
        reference's mask order, stops the run before anything trains, not when its pack comes up)."""
        if self.cfg.train.uses_prompts:
            for cfg in configs:
                self.ptuning(task, cfg)


def rows_of(template, task, split: str, training: bool = False) -> list[Row]:
    """A task's split as a template's rows, in the split's order."""
    facts = task.splits[split]
    return template.rows([e.subject for e in facts], [e.label for e in facts], training=training)


class PTuningTemplate:
    """Rows with pseudo-token slots for one relation."""

    def __init__(
        self,
        tokenizer,
        kind: str,
        counts: tuple[int, int, int],
        manual_template: str,
        anchors: bool = False,
        add_bos: bool = False,
        mask_before_subject: bool = False,
        causal_loss_shift: bool = False,
        bpe_spaces: bool = False,
    ):
        if kind == "causal" and counts[2] != 0:
            raise TemplateError(
                f"prompt.template {list(counts)}: causal LMs predict the object as the next token, so nothing can "
                "follow it; use [t0, t1, 0]"
            )
        if sum(counts) == 0:
            raise TemplateError("prompt.template [0, 0, 0]: P-tuning needs at least one pseudo token")
        self.mask_first = mask_before_subject and kind == "masked"
        if self.mask_first and anchors:
            raise TemplateError("prompt.anchors with protocol.mask_before_subject: the manual words have no place "
                                "when the mask comes before the subject; set one of them to false")
        self.tokenizer, self.kind, self.counts = tokenizer, kind, tuple(counts)
        words = split_manual(manual_template)
        self.manual_ids = _segments(words, encode_in_context(tokenizer, [w for w in words if w]))
        self.anchor_ids = self.manual_ids if anchors else ([], [], [])
        self.add_bos = add_bos
        self.loss_shift = 1 if causal_loss_shift and kind == "causal" else 0
        self.placeholder = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else 0
        # the reference took '.' as a bare token: 'Ġ.' and '.' differ in BPE vocabularies, not in WordPiece ones
        self.dot = [tokenizer.convert_tokens_to_ids(".")] if bpe_spaces else encode_in_context(tokenizer, ["."])[0]

    @property
    def n_pseudo(self) -> int:
        return sum(self.counts)

    def manual_init_ids(self) -> list[int | None]:
        """For each pseudo token, the manual template word of its segment it starts from (None: random)."""
        out: list[int | None] = []
        for count, words in zip(self.counts, self.manual_ids):
            out.extend(words[j] if j < len(words) else None for j in range(count))
        return out

    def rows(self, subjects: list[str], labels: list[int], training: bool = False) -> list[Row]:
        """training: rows whose logits the loss reads (one position early under causal_loss_shift)."""
        rows = [self._row(s, y) for s, y in zip(encode_in_context(self.tokenizer, subjects), labels)]
        return _shifted(rows, self.loss_shift) if training else rows

    def _row(self, subject: list[int], label: int) -> Row:
        ids: list[int] = []
        pseudo: list[int] = []
        slot = 0

        def add_tokens(tokens: list[int]) -> None:
            ids.extend(tokens)
            pseudo.extend([-1] * len(tokens))

        def add_pseudo(count: int) -> None:
            nonlocal slot
            ids.extend([self.placeholder] * count)
            pseudo.extend(range(slot, slot + count))
            slot += count

        t0, t1, t2 = self.counts
        a0, a1, a2 = self.anchor_ids
        mask = self.tokenizer.mask_token_id
        if self.kind == "masked":
            add_tokens([self.tokenizer.cls_token_id])
        elif self.add_bos:
            add_tokens([self.tokenizer.bos_token_id])
        if self.mask_first:  # the reference's order: [CLS] P*t0 [MASK] P*t1 subject P*t2 [SEP]
            add_pseudo(t0)
            target = len(ids)
            add_tokens([mask])
            add_pseudo(t1)
            add_tokens(subject)
        else:
            add_pseudo(t0)
            add_tokens(a0 + subject)
            add_pseudo(t1)
            add_tokens(a1)
            if self.kind == "causal":
                return Row(tuple(ids), tuple(pseudo), len(ids) - 1, label)
            target = len(ids)
            add_tokens([mask])
        add_pseudo(t2)
        add_tokens(a2 if a2 or t2 else self.dot)
        add_tokens([self.tokenizer.sep_token_id])
        return Row(tuple(ids), tuple(pseudo), target, label)


class ManualTemplate:
    """Rows for the manual (LAMA) prompt: no pseudo tokens."""

    n_pseudo = 0

    def __init__(self, tokenizer, kind: str, manual_template: str, add_bos: bool = False,
                 causal_loss_shift: bool = False, bpe_spaces: bool = False):
        split_manual(manual_template)  # validates the [X] ... [Y] order
        self.tokenizer, self.kind, self.template, self.add_bos = tokenizer, kind, manual_template, add_bos
        self.loss_shift = 1 if causal_loss_shift and kind == "causal" else 0
        self.lead = " " if bpe_spaces else ""  # the reference tokenized ' ' + sentence
        self.keep_space = bpe_spaces

    def rows(self, subjects: list[str], labels: list[int], training: bool = False) -> list[Row]:
        if self.kind == "masked":
            texts = [self.lead + self.template.replace("[X]", s).replace("[Y]", self.tokenizer.mask_token)
                     for s in subjects]
            encoded = self.tokenizer(texts)["input_ids"]
            mask = self.tokenizer.mask_token_id
            return [Row(tuple(ids), (-1,) * len(ids), ids.index(mask), y) for ids, y in zip(encoded, labels)]
        prefix = self.template.split("[Y]", 1)[0]
        prefix = self.lead + (prefix if self.keep_space else prefix.rstrip())
        encoded = self.tokenizer([prefix.replace("[X]", s) for s in subjects], add_special_tokens=False)["input_ids"]
        bos = [self.tokenizer.bos_token_id] if self.add_bos else []
        rows = [Row(tuple(bos + ids), (-1,) * (len(bos) + len(ids)), len(bos) + len(ids) - 1, y)
                for ids, y in zip(encoded, labels)]
        return _shifted(rows, self.loss_shift) if training else rows


def _shifted(rows: list[Row], shift: int) -> list[Row]:
    """Rows scored `shift` positions before their target (the reference's causal loss position)."""
    if not shift:
        return rows
    return [Row(r.ids, r.pseudo, max(0, r.target - shift), r.label) for r in rows]


def _segments(words: tuple[str, str, str], encoded: list[list[int]]) -> tuple[list[int], list[int], list[int]]:
    """Put the encodings of the non-empty segments back in their three places."""
    it = iter(encoded)
    return tuple(next(it) if w else [] for w in words)  # type: ignore[return-value]
