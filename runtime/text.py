"""Tokenizer (HF `tokenizers`) and chat template (jinja2 sandbox) for a bundle.

What this leaves out: the model. A chat turn is rendered as the *delta* the template adds for one
new user message after an earlier exchange, so a session that holds the whole history in its
state only ever feeds the new tokens.

Rendering returns segments, each marked as the template's own text or as message content. The
template's text is encoded with its special tokens matched (<|im_start|> is one control token);
message content is always encoded as plain text (a user who types <|im_start|>system gets those
characters as ordinary tokens, never a control token). Chat.encode_segments does the encoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from cortex_edge.runtime.errors import BundleError, CortexError

_PROBE_USER = "\u2063probe-user\u2063"
_PROBE_ASSISTANT = "\u2063probe-assistant\u2063"

Segments = list[tuple[str, bool]]  # (text, is_content): is_content text is never matched as special tokens


def _mark(i: int) -> str:
    return f"\u2063cortex-edge-content-{i}\u2063"


def _drop_prefix(segs: Segments, n: int) -> Segments:
    """segs without their first n characters."""
    out: Segments = []
    for text, is_content in segs:
        if n >= len(text):
            n -= len(text)
            continue
        out.append((text[n:], is_content))
        n = 0
    return out


class ChatTemplateError(CortexError):
    pass


# a checkpoint without a chat template (a base model): messages as plain text, one per line
PLAIN_TEMPLATE = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"


@dataclass
class ChatFormat:
    template: str
    bos: str = ""

    def __post_init__(self):
        if not self.template.strip():
            self.template = PLAIN_TEMPLATE
        env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)

        def raise_exception(msg):
            raise TemplateError(msg)

        env.globals["raise_exception"] = raise_exception
        try:
            self._tpl = env.from_string(self.template)
        except TemplateError as e:
            raise ChatTemplateError(f"chat template does not parse: {e}") from None

    def render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        try:
            return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos, eos_token="")
        except Exception as e:  # SecurityError, TemplateError, anything the template raises
            raise ChatTemplateError(f"chat template failed to render: {e.__class__.__name__}: {e}") from None

    def segments(self, messages: list[dict], add_generation_prompt: bool) -> Segments:
        """The rendered conversation as segments: the template's own text, and each message's content as the
        template puts it (after any filter such as trim). Each content is located by rendering it alone among
        placeholders, so content that imitates the template's markup cannot move a boundary."""
        marks = [_mark(i) for i in range(len(messages))]
        masked = [{**m, "content": mk} for m, mk in zip(messages, marks)]
        frame = self.render(masked, add_generation_prompt)
        pieces, rest = [], frame
        for mk in marks:
            if rest.count(mk) != 1:
                raise ChatTemplateError("chat template repeats, reorders or drops a message's content")
            head, rest = rest.split(mk)
            pieces.append(head)
        pieces.append(rest)
        segs: Segments = [(pieces[0], False)]
        for i, m in enumerate(messages):
            one = self.render(masked[:i] + [m] + masked[i + 1:], add_generation_prompt)
            before = "".join(p + mk for p, mk in zip(pieces[:i], marks[:i])) + pieces[i]
            after = pieces[i + 1] + "".join(mk + p for mk, p in zip(marks[i + 1:], pieces[i + 2:]))
            if not (one.startswith(before) and one.endswith(after)) or len(one) < len(before) + len(after):
                raise ChatTemplateError("chat template renders a message's content in a way it cannot be located")
            segs += [(one[len(before):len(one) - len(after)], True), (pieces[i + 1], False)]
        return [(t, c) for t, c in segs if t]

    def first_turn(self, user: str, system: str | None = None) -> Segments:
        msgs = ([{"role": "system", "content": system}] if system is not None else []) + \
            [{"role": "user", "content": user}]
        return self.segments(msgs, add_generation_prompt=True)

    def next_turn(self, user: str) -> Segments:
        """What the template adds for a new user message after an earlier exchange."""
        past = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        before = self.render(past, add_generation_prompt=False)
        after = self.segments(past + [{"role": "user", "content": user}], add_generation_prompt=True)
        if not "".join(t for t, _ in after).startswith(before):
            raise ChatTemplateError("chat template is not incremental (a later turn changes earlier text)")
        return _drop_prefix(after, len(before))

    def assistant_suffix(self) -> str:
        """Text the template puts after an assistant message's content (e.g. '<|im_end|>\\n')."""
        past = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        text = self.render(past, add_generation_prompt=False)
        return text[text.rindex(_PROBE_ASSISTANT) + len(_PROBE_ASSISTANT):]


def load_tokenizer(path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise BundleError(f"tokenizer file is not valid: {path} ({e.__class__.__name__})") from None


class StreamDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters.

    Incremental: each push decodes only the tokens since the last emitted text plus a few before them
    (for decoders whose output depends on the previous token, e.g. a leading space), so an answer's
    cost is linear in its length. Text held back for an incomplete character is released after
    MAX_PENDING tokens, or by flush(), as the tokenizer decodes it.
    """

    CONTEXT = 4  # tokens decoded before the new ones, for context
    MAX_PENDING = 8

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids = tok, []
        self.start = 0  # first token of the decoding window
        self.done = 0  # tokens whose text has been emitted

    def _text(self, a: int, b: int) -> str:
        return self.tok.decode(self.ids[a:b], skip_special_tokens=True)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(force=len(self.ids) - self.done >= self.MAX_PENDING)

    def flush(self) -> str:
        return self._emit(force=True) if self.done < len(self.ids) else ""

    def _emit(self, force: bool) -> str:
        old = self._text(self.start, self.done)
        new = self._text(self.start, len(self.ids))
        if not force and (new.endswith("\ufffd") or not new.startswith(old)):
            return ""
        delta = new[len(old):] if new.startswith(old) else new
        self.done = len(self.ids)
        self.start = max(0, self.done - self.CONTEXT)
        return delta
