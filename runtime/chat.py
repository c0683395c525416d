"""A chat over one runtime state: turns in, streamed text out, committed whole or not at all.

The state holds the whole conversation (attention buffers + CMS memory), so a turn feeds only the
tokens its template adds. A turn works on a copy of the state and replaces the live one only when
it finishes; Ctrl-C (KeyboardInterrupt) mid-turn leaves the previous state untouched.
What this leaves out: the terminal (cli.py) and the disk (session.py).
"""

from __future__ import annotations

import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from cortex_edge.runtime.engine import Engine, State
from cortex_edge.runtime.errors import CortexError
from cortex_edge.runtime.sampling import Sampling, penalize, sample
from cortex_edge.runtime.text import ChatFormat, StreamDecoder, load_tokenizer

MAX_PROMPT_CHARS = 4_000_000


class PromptError(CortexError):
    pass


def clean_prompt(text: str) -> str:
    """Reject undecodable text and empties; drop control characters other than newline and tab."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise PromptError("prompt is not valid UTF-8") from None
    if len(text) > MAX_PROMPT_CHARS:
        raise PromptError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
    text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch) != "Cc")
    if not text.strip():
        raise PromptError("prompt is empty")
    return text


@dataclass
class TurnStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0


class Chat:
    def __init__(self, engine: Engine, state: State | None = None, turns: int = 0, system: str | None = None,
                 text_from: Chat | None = None, memory: bool = True):
        """text_from: another Chat of the same engine whose tokenizers and template this one shares.
        memory=False: the sidecar off (evaluations' control)."""
        self.engine = engine
        self.memory = memory
        b = engine.bundle
        tok_meta = b.manifest["tokenizer"]
        if text_from is not None:
            self.tok, self.plain, self.fmt = text_from.tok, text_from.plain, text_from.fmt
        else:
            path = b.file(b.tokenizer_file)
            self.tok = load_tokenizer(path)  # the template's text: special tokens matched
            self.plain = load_tokenizer(path)  # message content: special tokens never matched
            self.plain.encode_special_tokens = True
            self.fmt = ChatFormat(tok_meta.get("chat_template", ""), tok_meta.get("bos", "") or "")
        self.system = None if system is None else clean_prompt(system)
        self.stop_ids = {int(i) for i in tok_meta.get("stop_ids", [])}
        self.state = state if state is not None else engine.new_state()
        self.turns = turns
        self.last = TurnStats()

    def reset(self) -> None:
        self.state = self.engine.new_state()
        self.turns = 0

    def encode(self, text: str) -> list[int]:
        """The template's own text (its markers become control tokens)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_segments(self, segs) -> list[int]:
        ids: list[int] = []
        for text, is_content in segs:
            ids += (self.plain if is_content else self.tok).encode(text, add_special_tokens=False).ids
        return ids

    def turn(self, user: str, sampling: Sampling, max_new_tokens: int = 256, should_stop=None,
             stop: tuple[str, ...] = (), history: list[dict] | None = None) -> Iterator[str]:
        """Yields text deltas; commits the new state when the generator finishes (closing it early commits
        nothing). should_stop() true ends the answer where it is (as max_new_tokens does), still committed.
        stop: strings that end the answer (not shown). history: earlier messages of a new conversation
        (system / user / assistant dicts), rendered before user when the state is empty."""
        import time

        user = clean_prompt(user)
        if self.state.n == 0:
            msgs = ([{"role": "system", "content": self.system}] if self.system is not None else []) + \
                [{**m, "content": clean_prompt(m["content"]) if m["content"].strip() else ""} for m in history or []] + \
                [{"role": "user", "content": user}]
            segs = self.fmt.segments(msgs, add_generation_prompt=True)
        else:
            segs = self.fmt.next_turn(user)
        ids = self.encode_segments(segs)
        st = self.state.copy()
        rng = np.random.default_rng(sampling.seed)
        stats = TurnStats(prompt_tokens=len(ids))
        t0 = time.perf_counter()
        logits = self.engine.feed(st, ids, memory=self.memory)
        stats.prefill_s = time.perf_counter() - t0
        dec = StreamDecoder(self.tok)
        stopped = False
        recent = list(ids[-sampling.repeat_last_n:]) if sampling.repeat_last_n else []
        text, shown, held = "", 0, max((len(s) for s in stop), default=1) - 1  # chars kept back: a stop string
        cut_by_stop = False
        t0 = time.perf_counter()
        for _ in range(max_new_tokens):
            if should_stop is not None and should_stop():
                break
            tok = sample(penalize(logits, recent, sampling.repeat_penalty), sampling, rng)
            if sampling.repeat_last_n:
                recent = (recent + [tok])[-sampling.repeat_last_n:]
            logits = self.engine.feed(st, [tok], memory=self.memory)
            stats.new_tokens += 1
            if tok in self.stop_ids:
                stopped = True
                break
            text += dec.push(tok)
            # a new occurrence starts at or after `shown` (held keeps back len(longest stop) - 1 characters), so
            # only the unshown tail is searched: linear in the answer, not quadratic
            cut = min((i for i in (text.find(s, shown) for s in stop if s) if i >= 0), default=-1)
            if cut >= 0:  # a stop string: the answer ends before it
                if cut > shown:
                    yield text[shown:cut]
                cut_by_stop = True
                break
            if len(text) - held > shown:
                yield text[shown:len(text) - held]
                shown = len(text) - held
        if not cut_by_stop:
            text += dec.flush()
            if shown < len(text):
                yield text[shown:]
        stats.decode_s = time.perf_counter() - t0
        suffix = self.fmt.assistant_suffix()
        if stopped:  # the stop token was generated and fed; feed what the template puts after it
            for s in self.engine.bundle.manifest["tokenizer"].get("stop_tokens", []):
                if suffix.startswith(s):
                    suffix = suffix[len(s):]
                    break
        if suffix:
            self.engine.feed(st, self.encode(suffix), memory=self.memory)
        self.state = st
        self.turns += 1
        self.last = stats
