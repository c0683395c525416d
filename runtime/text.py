"""Tokenizer (HF `tokenizers`) and chat template (jinja2 sandbox) for a bundle.

What this leaves out: the model. A chat turn is rendered as the *delta* the template adds for one
new user message after an earlier exchange, so a session that holds the whole history in its
state only ever feeds the new tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from cortex_edge.runtime.errors import BundleError, CortexError

_PROBE_USER = "\u2063probe-user\u2063"
_PROBE_ASSISTANT = "\u2063probe-assistant\u2063"


class ChatTemplateError(CortexError):
    pass


@dataclass
class ChatFormat:
    template: str
    bos: str = ""

    def __post_init__(self):
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

    def first_turn(self, user: str) -> str:
        return self.render([{"role": "user", "content": user}], add_generation_prompt=True)

    def next_turn(self, user: str) -> str:
        """Text the template adds for a new user message after an earlier exchange."""
        past = [{"role": "user", "content": _PROBE_USER}, {"role": "assistant", "content": _PROBE_ASSISTANT}]
        before = self.render(past, add_generation_prompt=False)
        after = self.render(past + [{"role": "user", "content": user}], add_generation_prompt=True)
        if not after.startswith(before):
            raise ChatTemplateError("chat template is not incremental (a later turn changes earlier text)")
        return after[len(before):]

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
    """Turns a growing list of token ids into text deltas without splitting UTF-8 characters."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.text = tok, [], ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for more
            return ""
        delta, self.text = text[len(self.text):], text
        return delta
