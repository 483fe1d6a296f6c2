"""Templates and their tokenisation.

A template is text with one ``{prompt}`` slot, one ``{target}`` field at the very end and any number of
other example fields. Each literal piece and each field value is tokenised on its own (no special tokens,
except the tokenizer's own start token at the very beginning where it adds one). Whitespace right before
a field goes with the field's value (" {input}" with "hot" tokenises " hot"); whitespace right before
``{prompt}`` is absorbed by the prompt. For the reference template and GPT-2 BPE this reproduces the
notebook's whole-sentence tokenisation with " antonyms" at token positions 3..6.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .errors import DataError, TemplateError

DEFAULT_TEMPLATE = "Here are two {prompt} {input} and {target}"
_FIELD = re.compile(r"\{([^{}]*)\}")


@dataclass(frozen=True)
class Piece:
    kind: str  # "text" | "prompt" | "field"
    text: str = ""  # literal text, or the whitespace that leads a field's value
    name: str = ""  # field name


@dataclass(frozen=True)
class Template:
    """A parsed template, e.g. ``Template("Here are two {prompt} {input} and {target}")``."""

    text: str = DEFAULT_TEMPLATE
    pieces: tuple[Piece, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "pieces", _parse(self.text))

    @property
    def fields(self) -> tuple[str, ...]:
        """Example fields in order of first appearance, the target last."""
        seen: list[str] = []
        for p in self.pieces:
            if p.kind == "field" and p.name not in seen:
                seen.append(p.name)
        return tuple(seen)

    @property
    def input_fields(self) -> tuple[str, ...]:
        return tuple(f for f in self.fields if f != "target")

    def as_fields(self, example: Any, index: int | None = None) -> dict[str, str]:
        """An example as a mapping field -> value; ``(input, target)`` pairs need one input field."""
        where = f"example {index}" if index is not None else "example"
        if isinstance(example, Mapping):
            missing = [f for f in self.fields if f not in example]
            if missing:
                raise DataError(f"{where} has no field {missing[0]!r} (the template needs: {', '.join(self.fields)})")
            values = {f: example[f] for f in self.fields}
        elif isinstance(example, Sequence) and not isinstance(example, str):
            if len(self.input_fields) != 1 or len(example) != 2:
                raise DataError(
                    f"{where} is a sequence of {len(example)} values but the template has fields "
                    f"{', '.join(self.fields)}: give (input, target) pairs for a template with one input "
                    "field, or mappings from field name to value"
                )
            values = {self.input_fields[0]: example[0], "target": example[1]}
        else:
            raise DataError(f"{where} must be an (input, target) pair or a mapping, got {type(example).__name__}")
        for name, value in values.items():
            if not isinstance(value, str):
                raise DataError(f"{where}: field {name!r} must be a string, got {type(value).__name__}")
            if not value.strip():
                raise DataError(f"{where}: field {name!r} is empty")
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise DataError(f"{where}: field {name!r} holds an unpaired surrogate (a \\ud800-\\udfff escape "
                                "that is no character)") from None
        return values

    def render(self, example: Any, prompt_text: str = "<prompt>") -> str:
        """The example as text, with ``prompt_text`` in the prompt slot (for samples and logs)."""
        values = self.as_fields(example)
        out = []
        for p in self.pieces:
            if p.kind == "text":
                out.append(p.text)
            elif p.kind == "prompt":
                out.append((" " if out and not out[-1].endswith(" ") else "") + prompt_text)
            else:
                out.append(p.text + values[p.name])
        return "".join(out)


def _parse(text: str) -> tuple[Piece, ...]:
    if not isinstance(text, str) or not text:
        raise TemplateError("the template must be a non-empty string")
    stripped = _FIELD.sub("", text)
    if "{" in stripped or "}" in stripped:
        raise TemplateError(f"unbalanced brace in template {text!r}")
    names = _FIELD.findall(text)
    for name in names:
        if not name.isidentifier():
            raise TemplateError(f"bad field name {{{name}}} in template {text!r}: use letters, digits and _")
    if names.count("prompt") != 1:
        raise TemplateError(f"the template must contain {{prompt}} exactly once: {text!r}")
    if names.count("target") != 1:
        raise TemplateError(f"the template must contain {{target}} exactly once: {text!r}")
    if not text.endswith("{target}"):
        raise TemplateError(f"{{target}} must be the last thing in the template: {text!r}")
    pieces: list[Piece] = []
    pos = 0
    for m in _FIELD.finditer(text):
        literal = text[pos : m.start()]
        name = m.group(1)
        core = literal.rstrip()
        lead = literal[len(core) :]
        if core:
            pieces.append(Piece("text", core))
        if name == "prompt":
            pieces.append(Piece("prompt"))  # the whitespace before the slot is absorbed by the prompt
        else:
            pieces.append(Piece("field", lead, name))
        pos = m.end()
    return tuple(pieces)


@dataclass(frozen=True)
class Encoded:
    """One tokenised example. ``ids`` holds a placeholder at the prompt slot."""

    ids: tuple[int, ...]
    prompt_start: int  # first prompt position
    target_start: int  # first target position; the target runs to the end

    @property
    def target_len(self) -> int:
        return len(self.ids) - self.target_start


class TemplateEncoder:
    """Tokenises examples for one template, tokenizer and prompt length.

    Every example's ids split at two offsets that are the same for all (docs/ARCHITECTURE.md, 'Spans of a template'):

    ``[0, n_context)``         the *context*: constant text before both the prompt and the first field
    ``[n_context, n_shared)``  the *trunk*: the prompt and the text after it up to the first field, shared by
                               every example (empty where a field precedes the prompt)
    ``[n_shared, ...)``        the example's own *suffix*, from its first field on

    ``shared_ids`` are the first ``n_shared`` ids (context and trunk, the prompt as placeholders).
    """

    def __init__(self, template: Template | str, tokenizer, prompt_len: int, max_len: int | None = None):
        self.template = template if isinstance(template, Template) else Template(template)
        if not isinstance(prompt_len, int) or prompt_len < 1:
            raise TemplateError(f"prompt length must be a positive integer, got {prompt_len!r}")
        self.tokenizer = tokenizer
        self.prompt_len = prompt_len
        self.max_len = max_len
        self.placeholder = 0
        self._cache: dict[str, list[int]] = {}
        self.bos = _leading_bos(tokenizer)
        ids: list[int] = list(self.bos)
        prompt_start = None
        for p in self.template.pieces:
            if p.kind == "field":
                break
            if p.kind == "text":
                ids += self.tokenize(p.text)
            else:
                prompt_start = len(ids)
                ids += [self.placeholder] * prompt_len
        first_field = len(ids)
        self.shared_ids = tuple(ids)  # context and trunk
        self.n_shared = first_field
        self.n_context = prompt_start if prompt_start is not None else first_field
        self.prompt_start = prompt_start  # None when an example field precedes the prompt
        if max_len is not None and prompt_len + len(self.bos) > max_len:
            raise TemplateError(f"prompt length {prompt_len} does not fit the model's context of {max_len} tokens")

    def tokenize(self, text: str) -> list[int]:
        ids = self._cache.get(text)
        if ids is None:
            ids = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = ids
        return ids

    def encode(self, example: Any, index: int | None = None) -> Encoded:
        values = self.template.as_fields(example, index)
        ids = list(self.shared_ids)
        prompt_start = self.prompt_start
        target_start = None
        started = False
        for p in self.template.pieces:
            if not started:
                started = p.kind == "field"
                if not started:
                    continue
            if p.kind == "text":
                ids += self.tokenize(p.text)
            elif p.kind == "prompt":
                prompt_start = len(ids)
                ids += [self.placeholder] * self.prompt_len
            else:
                value_ids = self.tokenize(p.text + values[p.name])
                if not value_ids:
                    raise DataError(f"example {index}: field {p.name!r} = {values[p.name]!r} tokenises to nothing")
                if p.name == "target":
                    target_start = len(ids)
                ids += value_ids
        if self.max_len is not None and len(ids) > self.max_len:
            where = f"example {index}" if index is not None else "an example"
            raise DataError(
                f"{where} is {len(ids)} tokens long with the prompt, more than the model's context of {self.max_len}"
            )
        return Encoded(tuple(ids), prompt_start, target_start)

    def encode_all(self, examples: Sequence[Any]) -> list[Encoded]:
        if len(examples) == 0:
            raise DataError("no examples given")
        return [self.encode(ex, i) for i, ex in enumerate(examples)]


def _leading_bos(tokenizer) -> tuple[int, ...]:
    """The tokenizer's own start token, where it adds one by default (Llama, Gemma); none for GPT-2."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return ()
    ids = tokenizer("a")["input_ids"]
    return (bos,) if len(ids) > 0 and ids[0] == bos else ()
